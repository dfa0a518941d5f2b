"""What a run hands a controller: ``RunState`` (per run), ``StepView`` (per step), ``LoopDraft``
(at the end), and what ``run_loop`` returns: ``LoopOutput``.

All four are plain objects with public constructors, so code other than ``run_loop`` (decoding,
replaying a stored trajectory) can drive a controller through the same protocol; see
``halting.base`` for the protocol itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RunState:
    """The per-run state of one controller run, created by the run's driver and passed to
    ``controller.begin``; the controller reads it (``controller.run``) until ``finish``.

    Attributes:
        batch: B, rows of the full batch.
        seq_len: T, positions per row.
        max_loops: the cap of this run.
        min_loops: no unit stops before this many loops (the driver's bound combined with the
            controller's own ``min_loops()``).
        granularity: ``sample`` (units are rows) or ``token`` (units are positions).
        device: where the buffers live.
        training: the run's mode (see ``halting.loop``, "Modes").
        buffers: full-batch tensors indexed by original row (``view.rows``), so compaction never
            scrambles them; create them with ``buffer``.
        steps: per-step tensors kept for ``finish`` (``append``).
    """

    batch: int
    seq_len: int
    max_loops: int
    min_loops: int = 1
    granularity: str = "sample"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    training: bool = False
    buffers: dict[str, Tensor] = field(default_factory=dict)
    steps: dict[str, list[Tensor]] = field(default_factory=dict)

    @property
    def unit(self) -> tuple[int, ...]:
        """Shape of one value per halting unit: (B,) or (B, T)."""
        return (self.batch,) if self.granularity == "sample" else (self.batch, self.seq_len)

    def buffer(self, name: str, fill: float = 0.0, dtype: torch.dtype = torch.float32,
               shape: tuple[int, ...] | None = None) -> Tensor:
        """The full-batch buffer ``name`` (default shape ``unit``), created filled on first use."""
        if name not in self.buffers:
            self.buffers[name] = torch.full(self.unit if shape is None else shape, fill,
                                            dtype=dtype, device=self.device)
        return self.buffers[name]

    def swap(self, name: str, rows: Tensor, current: Tensor) -> Tensor | None:
        """Store ``current`` (n, ...) for ``rows``; return what those rows stored the previous
        time (``None`` on the first call of the run)."""
        current = current.detach()
        full = self.buffers.get(name)
        previous = None if full is None else full[rows]
        if full is None:
            full = current.new_zeros((self.batch, *current.shape[1:]))
        full[rows] = current
        self.buffers[name] = full
        return previous

    def append(self, name: str, value: Tensor) -> None:
        """Keep one step's ``value`` under ``steps[name]`` (kept with its graph)."""
        self.steps.setdefault(name, []).append(value)


class StepView:
    """One step as a controller sees it; every derived quantity is computed on first use.

    Build one per step with the running rows only: ``StepView(model, ctx, k, z, z_prev, rows,
    granularity, active, max_loops)``; ``model`` needs only ``readout`` / ``halt_logit`` for what
    the controller reads (a replay of stored states may pass a stand-in).

    Attributes:
        k: 0-based index of the step just run; ``loops = k + 1`` loops are done.
        z: (n, T, D) the new state of the running rows; ``z_prev`` the state before the step.
        rows: (n,) int64 original batch indices of the running rows.
        ctx: the ``LoopContext`` of the running rows.
        active: (n, T) bool tokens still running (token granularity) or ``None``.
        max_loops: the last loop this run may take (``is_last`` compares with it).
    """

    def __init__(self, model: nn.Module, ctx: Any, k: int, z: Tensor, z_prev: Tensor,
                 rows: Tensor, granularity: str, active: Tensor | None,
                 max_loops: int) -> None:
        self.model, self.ctx, self.k = model, ctx, k
        self.z, self.z_prev, self.rows = z, z_prev, rows
        self.granularity, self.active, self.max_loops = granularity, active, max_loops
        self.readout_tokens = 0
        self.logged: dict[str, Tensor] = {}
        self._cache: dict[str, Tensor] = {}

    @property
    def loops(self) -> int:
        return self.k + 1

    @property
    def is_last(self) -> bool:
        return self.loops >= self.max_loops

    def logits(self) -> Tensor:
        """(n, T, V) readout of the new state (computed once)."""
        if "logits" not in self._cache:
            self._cache["logits"] = self.model.readout(self.z, self.ctx)
            self.readout_tokens += self.z.shape[0] * self.z.shape[1]
        return self._cache["logits"]

    def log_probs(self) -> Tensor:
        """(n, T, V) float32 log-softmax of ``logits()``."""
        if "log_probs" not in self._cache:
            self._cache["log_probs"] = F.log_softmax(self.logits().float(), dim=-1)
        return self._cache["log_probs"]

    def probs(self) -> Tensor:
        return self.log_probs().exp()

    def halt_logit(self) -> Tensor:
        """(n, T) the model's exit-gate logit at the new state."""
        if "halt_logit" not in self._cache:
            self._cache["halt_logit"] = self.model.halt_logit(self.z, self.ctx)
        return self._cache["halt_logit"]

    def token_residual(self) -> Tensor:
        """(n, T) ||z_k - z_{k-1}|| / ||z_k|| per token (norm over D), float32, no grad."""
        if "token_residual" not in self._cache:
            with torch.no_grad():
                diff = (self.z - self.z_prev).float().norm(dim=-1)
                self._cache["token_residual"] = diff / self.z.float().norm(dim=-1).clamp_min(1e-12)
        return self._cache["token_residual"]

    def residual(self) -> Tensor:
        """(n,) ||z_k - z_{k-1}|| / ||z_k|| over the whole row (T x D) — the trace's residual.

        At token granularity the per-token value (n, T) is returned instead.
        """
        if self.granularity == "token":
            return self.token_residual()
        if "residual" not in self._cache:
            with torch.no_grad():
                diff = (self.z - self.z_prev).float().flatten(1).norm(dim=1)
                norm = self.z.float().flatten(1).norm(dim=1).clamp_min(1e-12)
                self._cache["residual"] = diff / norm
        return self._cache["residual"]

    def log(self, name: str, value: Tensor) -> None:
        """Record a per-running-row (n,) or per-token (n, T) diagnostic under ``trace[name]``."""
        self.logged[name] = value.detach()


@dataclass
class LoopDraft:
    """A run's result before the controller's ``finish``: what ``LoopOutput`` will hold.

    ``logits`` is the readout at each unit's exit, or ``None`` when the controller declares that
    it provides the logits in this mode (``Capabilities.provides_logits``): its ``finish`` sets
    them. ``finish`` may also replace ``depth`` (training-time exits) and add to ``aux``.
    Attributes as in ``LoopOutput``.
    """

    logits: Tensor | None
    depth: Tensor
    executed: int
    trace: dict[str, Tensor] = field(default_factory=dict)
    states: Tensor | None = None
    step_logits: Tensor | None = None
    aux: dict[str, Any] = field(default_factory=dict)
    max_loops: int = 0
    granularity: str = "sample"
    training: bool = False

    def complete(self, controller_name: str) -> LoopOutput:
        """The ``LoopOutput``; a ``RuntimeError`` if the controller left ``logits`` unset."""
        if self.logits is None:
            raise RuntimeError(f"controller {controller_name!r} declares that it provides the "
                               "logits but its finish() left them unset")
        return LoopOutput(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass
class LoopOutput:
    """What ``run_loop`` returns; every field is set (``flops`` NaN when the model cannot say).

    Attributes:
        logits: (B, T, V) each row's (or token's) readout at its own exit; ACT: its mixture.
        depth: (B,) or (B, T) int64 loops used by each row / token.
        executed: row-steps actually computed (token-steps at token granularity).
        trace: per-step diagnostics, each (K, B) or (K, B, T) float with NaN where a row (token)
            was not running; ``active`` is (K,) rows (tokens) computed per step.
        states: (K+1, B, T, D) z_0..z_K when ``record=True`` (NaN for rows that had left).
        step_logits: (K, B, T, V) per-step readouts, only when the controller needs them.
        aux: differentiable per-step tensors a controller keeps for its loss (e.g. ``lambda``).
        loss_terms: filled by ``controller.loss_terms`` (or ``run_loop(..., targets=...)``).
        max_loops: the cap this run used.
        granularity: ``sample`` or ``token``.
        training: the run's mode (``True``: the controller ran its training behaviour).
        flops: approximate FLOPs (see ``halting.loop`` docstring).
        ctx: the whole batch's ``LoopContext`` as the loop left it (``model.prepare`` plus every
            step's cache writes), only with ``run_loop(..., return_ctx=True)``; else ``None``.
    """

    logits: Tensor
    depth: Tensor
    executed: int
    trace: dict[str, Tensor] = field(default_factory=dict)
    states: Tensor | None = None
    step_logits: Tensor | None = None
    aux: dict[str, Any] = field(default_factory=dict)
    loss_terms: dict[str, Tensor] = field(default_factory=dict)
    max_loops: int = 0
    granularity: str = "sample"
    training: bool = False
    flops: float = 0.0
    ctx: Any = None

    @property
    def halted_at_cap(self) -> float:
        """Share of rows (tokens) whose exit is the cap ``max_loops`` (collapse monitor)."""
        return (self.depth == self.max_loops).float().mean().item()

    @property
    def mean_depth(self) -> float:
        return self.depth.float().mean().item()

    def exit_entropy(self) -> float:
        """Entropy (nats) of the empirical exit-depth distribution; 0 when every exit is equal."""
        counts = torch.bincount(self.depth.flatten(), minlength=self.max_loops + 1).float()
        share = counts / counts.sum()
        return float(-(torch.xlogy(share, share)).sum())
