"""The loop-controller contract: ``LoopController``, the per-step ``StepView``, ``LoopOutput``.

``run_loop`` (``halting.loop``) is the only place the loop is written. Each step it hands the
controller a ``StepView`` of the rows still running and gets back a bool tensor of the rows (sample
granularity, shape (n,)) or tokens (token granularity, shape (n, T)) that stop now, or ``None`` when
nothing stops this step (the cheap answer: no host synchronisation). Everything a controller may
read is computed lazily and cached on the view — logits, probabilities, the model's halt logit, the
relative residual — so a controller pays only for what it reads.

Controllers keep per-run state in full-batch buffers indexed by ``view.rows`` (the original batch
indices of the running rows), so compaction never scrambles it. Controllers with parameters
(``q_halt``'s head) are ``nn.Module``s like every controller here; ``train()``/``eval()`` switch
between their training and evaluation behaviour.

Training: ``controller.loss_terms(out, targets)`` returns named scalar losses whose sum is the
training loss; the trainer adds them and never branches on the controller's type.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.constants import GRANULARITIES, IGNORE_INDEX
from common.registry import Registry, call_with_known

CONTROLLERS: Registry[type[LoopController]] = Registry("controller")


@dataclass
class LoopOutput:
    """What ``run_loop`` returns.

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
        training: whether the controller ran in training mode.
        flops: approximate FLOPs (see ``halting.loop`` docstring).
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


class StepView:
    """One step as a controller sees it; every derived quantity is computed on first use.

    Attributes:
        k: 0-based index of the step just run; ``loops = k + 1`` loops are done.
        z: (n, T, D) the new state of the running rows; ``z_prev`` the state before the step.
        rows: (n,) int64 original batch indices of the running rows.
        ctx: the ``LoopContext`` of the running rows.
        active: (n, T) bool tokens still running (token granularity) or ``None``.
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


class LoopController(nn.Module):
    """Base class of every loop controller.

    Subclasses set ``name`` (the registry key), ``granularities`` and override ``decide``; learned
    controllers also override ``loss_terms`` and usually ``finish``.

    Class attributes:
        granularities: the granularities this controller supports.
        static: ``True`` when ``decide`` never stops a row and reads nothing (``fixed``): run_loop
            then skips building step views altogether.
    """

    name = "base"
    granularities: tuple[str, ...] = GRANULARITIES
    static = False

    def __init__(self) -> None:
        super().__init__()
        self._run: dict[str, Any] = {}
        self.explicit_mode: bool | None = None

    def train(self, mode: bool = True) -> LoopController:
        """Set the mode, remembering that it was set by hand (``run_loop`` warns when a run's
        mode disagrees with it; see ``halting.loop``)."""
        self.explicit_mode = bool(mode)
        return super().train(mode)

    # -- per-run hooks -------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        """Adapt to ``model`` (create heads of its width, check its vocabulary); idempotent.

        ``run_loop`` calls it first; call it yourself before building an optimiser over
        ``controller.parameters()`` (``q_halt`` creates its Q-head here unless given ``d_model``).
        """

    def ensure_bound(self, model: nn.Module) -> None:
        """``bind``, warning when that created parameters in training mode (an optimiser built
        earlier would silently leave them untrained)."""
        before = len(list(self.parameters()))
        self.bind(model)
        if self.training and len(list(self.parameters())) != before:
            warnings.warn(f"controller {self.name!r} created parameters on its first run; an "
                          "optimiser built before this does not train them. Call "
                          "controller.bind(model) before building the optimiser.", stacklevel=3)

    def planned_loops(self, max_loops: int) -> int:
        """How many steps the loop runs at most under this controller (``fixed``: its ``loops``)."""
        return max_loops

    def min_loops(self) -> int:
        """The controller's own lower bound on loops (combined with run_loop's ``min_loops``)."""
        return 1

    def needs_step_logits(self) -> bool:
        """Whether run_loop must keep every step's readout in ``LoopOutput.step_logits``."""
        return False

    def provides_logits(self) -> bool:
        """Whether ``finish`` sets ``out.logits`` itself (run_loop then skips its exit readout)."""
        return False

    def begin(self, batch: int, seq_len: int, max_loops: int, granularity: str,
              device: torch.device) -> None:
        """Reset per-run state; called once per ``run_loop`` before step 0."""
        unit = (batch,) if granularity == "sample" else (batch, seq_len)
        self._run = {"unit": unit, "max_loops": max_loops, "granularity": granularity,
                     "device": device}

    def decide(self, view: StepView) -> Tensor | None:
        """Bool tensor of running rows (n,) / tokens (n, T) that stop after this step, or None."""
        return None

    def finish(self, out: LoopOutput) -> None:
        """Post-process the output (mixtures, training-time exits, aux tensors); default: none."""

    def loss_terms(self, out: LoopOutput, targets: Tensor) -> dict[str, Tensor]:
        """Named scalar training losses; default ``{"task": CE of the exit logits}``."""
        terms = {"task": task_loss(out.logits, targets)}
        out.loss_terms = terms
        return terms

    # -- helpers for subclasses ----------------------------------------------------------------
    def buffer(self, name: str, fill: float = 0.0, dtype: torch.dtype = torch.float32) -> Tensor:
        """A full-batch per-unit buffer ((B,) or (B, T)) kept for this run, created on first use."""
        if name not in self._run:
            self._run[name] = torch.full(self._run["unit"], fill, dtype=dtype,
                                         device=self._run["device"])
        return self._run[name]

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.hparams().items())

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments (for logging and configs)."""
        return {}


def task_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Token cross-entropy averaged over non-ignored targets (``-100`` = ignore)."""
    check_targets(logits, targets)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


def check_targets(logits: Tensor, targets: Tensor) -> None:
    if not isinstance(targets, Tensor) or targets.dtype != torch.long:
        got = getattr(targets, "dtype", type(targets).__name__)
        raise TypeError(f"targets must be an int64 tensor, got {got}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal (B, T) = "
                         f"{tuple(logits.shape[:2])}")


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False, integer: bool = False) -> None:
    """Raise ``ValueError`` naming ``name``, the bad value and the allowed range."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (
            not integer and not math.isfinite(value)):
        raise ValueError(f"{name} must be a{'n integer' if integer else ' finite number'}, "
                         f"got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def build_controller(name_or_cfg: str | Mapping[str, Any] | LoopController,
                     **kw: Any) -> LoopController:
    """Build a controller from a registry name or a mapping ``{"name": ..., **params}``.

    Example:
        >>> build_controller("convergence", criterion="kl", threshold=5e-4)
        >>> build_controller({"name": "pondernet", "lambda_prior": 0.2})

    Raises:
        KeyError: unknown controller name (the message lists the known ones).
        ValueError: a parameter out of range (named with the allowed range).
        TypeError: an unknown parameter.
    """
    if isinstance(name_or_cfg, LoopController):
        if kw:
            raise TypeError(f"cannot apply parameters {sorted(kw)} to an existing controller")
        return name_or_cfg
    if isinstance(name_or_cfg, Mapping):
        params = dict(name_or_cfg)
        if "name" not in params:
            raise KeyError(f"controller config needs a 'name'; known: {', '.join(CONTROLLERS)}")
        name = params.pop("name")
        params.pop("_target_", None)
        params.update(kw)
    elif isinstance(name_or_cfg, str):
        name, params = name_or_cfg, dict(kw)
    else:
        raise TypeError(f"controller must be a name or a mapping, got {type(name_or_cfg).__name__}")
    return call_with_known(CONTROLLERS.get(name), "controller", name, **params)
