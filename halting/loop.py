"""``run_loop``: the one place the loop over ``model.step`` is written, for every controller.

Step 0 always runs on the whole batch (it writes PLT's loop-1 cache). After each step the
controller says which rows (sample granularity) or tokens (token granularity) stop; then:

* **sample granularity** — stopped rows leave the active set: later steps run
  ``model.step(z[idx], ctx.select(idx), k)`` on the remaining rows only and their results are
  scattered back, so halting saves real compute (a mask would not: the batch would still run until
  its slowest row — the trap of CALM, FPRM and HRM evaluation, REFERENCE.md §2). The context is
  re-selected only when the active set changes, from the running rows' context, so anything a model
  wrote into ``ctx.cache`` after step 0 follows its rows.
* **token granularity** — halting is per position. Two policies define what a halted token looks
  like to the others (Huginn's warning, REFERENCE.md §2):

  - ``token_policy="frozen"`` (default): ``model.step(..., active=mask)`` computes only running
    positions; a halted position keeps its exit state exactly and stays visible to later positions
    as context through the keys/values cached the last time it was computed. ``executed`` counts
    the token-steps computed, so savings are visible.
  - ``token_policy="evolving"``: every position of a running row keeps being computed (halted ones
    included, so later positions see them keep evolving); a halted token's readout is still taken
    at its exit. Nothing is saved: ``executed`` counts every position of every running row.

  A row whose tokens have all halted leaves the batch, as at sample granularity.

Outputs: ``logits`` is each row's (token's) readout at its own exit — one ``readout`` of the exit
states after the loop (controllers that already keep per-step readouts, or ACT's mixture, supply
their own). ``depth`` is the loops used, ``executed`` the row-steps (token-steps) computed; the two
differ whenever a controller runs every row to the cap for its training objective.

FLOPs (approximate): ``executed x model.flops_per_token_step(T) x T`` (x 1 at token granularity,
where ``executed`` already counts tokens) plus ``2 D V`` per token read out (LM head only; prelude
and coda layers are not counted).

Modes: a controller's training and evaluation behaviour differ (learned halting runs every row to
the cap in training for its expected loss and exits early in evaluation; ``q_halt`` explores only in
training), so each run has exactly one mode and ``LoopOutput.training`` records it. By default
(``mode="auto"``) it is the **model's** mode: ``model.eval()`` is enough, ``run_loop`` puts the
controller in the same mode (``build_controller`` returns a controller in training mode, as every
``nn.Module``; that is not a choice and never overrides the model). ``mode="train"`` /
``mode="eval"`` force the controller's mode regardless of the model (the model's own mode — dropout
— stays the caller's: ``run_loop`` never changes it). A controller switched by hand
(``controller.train()`` / ``.eval()``) to the other mode than the model gets a warning under
``auto`` and follows the model. An evaluation-mode loss of a learned controller is the task loss
alone (its halting objective exists only in training), so ``backward`` through it raises instead of
silently training without that objective; computing and logging it stays allowed.

Truncated backpropagation (Huginn, arXiv 2502.05171): with ``grad_steps=n`` only the last ``n``
planned steps build a graph (earlier ones run under ``no_grad``); gradients still reach the
embeddings through the input injection. For adaptive controllers "last" means the last ``n`` of
``max_loops``, so rows that exit early may see no gradient through the loop.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from common.constants import TOKEN_POLICIES
from halting.base import (
    GRANULARITIES,
    LoopController,
    LoopDraft,
    LoopOutput,
    RunState,
    StepView,
    build_controller,
)

MODES = ("auto", "train", "eval")


def run_loop(model: nn.Module, tokens: Tensor, controller: LoopController | str | dict, *,
             max_loops: int, min_loops: int = 1, granularity: str = "sample",
             record: bool = False, token_policy: str = "frozen", grad_steps: int | None = None,
             targets: Tensor | None = None, mode: str = "auto",
             generator: torch.Generator | None = None, return_ctx: bool = False) -> LoopOutput:
    """Run ``model``'s loop on ``tokens`` under ``controller``.

    Args:
        model: a ``models.LoopedModel``.
        tokens: (B, T) int64.
        controller: a ``LoopController`` or anything ``build_controller`` accepts.
        max_loops: the cap; every row stops here at the latest.
        min_loops: no row stops before this many loops (combined with the controller's own).
        granularity: ``sample`` (rows halt) or ``token`` (positions halt).
        record: keep ``states`` and the per-step ``residual`` trace.
        token_policy: ``frozen`` or ``evolving`` (token granularity; see module docstring).
        grad_steps: backpropagate through the last ``grad_steps`` steps only.
        targets: (B, T) int64 (-100 = ignore); when given, ``loss_terms`` is filled.
        mode: the controller's mode for this run: ``auto`` (default) follows ``model.training``;
            ``train`` / ``eval`` force it. Recorded in ``LoopOutput.training`` (see module
            docstring, "Modes").
        generator: passed to ``model.init_state(ctx, generator=...)`` for a random initial
            state (``recurrent_depth``): a seeded ``torch.Generator`` on the tokens' device makes
            the run reproducible without touching torch's global RNG. ``None``: the model's
            default (the global RNG).
        return_ctx: also return the whole batch's ``LoopContext`` as the loop left it in
            ``LoopOutput.ctx`` (what ``readout``, ``step`` and ``halting.replay`` need to go on
            from the recorded states without preparing the tokens and running loop 0 again).

    Returns:
        LoopOutput.

    Example:
        >>> out = run_loop(model, tokens, "fixed", max_loops=4)  # fixed defaults to max_loops
    """
    controller = build_controller(controller)
    _validate(model, tokens, controller, max_loops, min_loops, granularity, token_policy,
              grad_steps)
    training = set_run_mode(controller, model, mode)
    controller.ensure_bound(model)
    ctx = model.prepare(tokens)
    z0 = model.init_state(ctx) if generator is None else model.init_state(ctx,
                                                                          generator=generator)
    batch, seq_len = tokens.shape
    state = RunState(batch=batch, seq_len=seq_len, max_loops=max_loops,
                     min_loops=max(min_loops, controller.min_loops()), granularity=granularity,
                     device=tokens.device, training=training)
    controller.begin(state)
    run = _Run(model, ctx, z0, controller, state, token_policy, record, grad_steps)
    capabilities = controller.capabilities
    if capabilities.drives_loop:
        run.execute_driven()
    elif capabilities.static:
        run.execute_static()
    else:
        run.execute()
    draft = run.draft()
    controller.finish(draft)
    out = draft.complete(controller.name)
    out.flops = run.flops(out.executed)
    if return_ctx:
        out.ctx = ctx
    if targets is not None:
        controller.loss_terms(out, targets)
    return out


def set_run_mode(controller: LoopController, model: nn.Module, mode: str = "auto") -> bool:
    """Put ``controller`` in the run's mode and return it (``True`` = training).

    ``auto`` takes the model's mode. A controller whose mode was set by hand (``.train()`` /
    ``.eval()``) to the other mode gets a warning under ``auto``: the model's mode wins.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    training = bool(model.training) if mode == "auto" else mode == "train"
    if mode == "auto" and controller.explicit_mode is not None and \
            controller.explicit_mode != training:
        was, now = ("train", "eval") if controller.explicit_mode else ("eval", "train")
        warnings.warn(f"controller {controller.name!r} was set to {was} mode but the model is in "
                      f"{now} mode; run_loop follows the model (mode='auto') and runs it in {now} "
                      f"mode. Pass mode='{was}' to run_loop to run it in {was} mode.",
                      stacklevel=3)
    nn.Module.train(controller, training)  # not a hand-set mode: keeps ``explicit_mode``
    return training


def _validate(model: Any, tokens: Any, controller: LoopController, max_loops: Any,
              min_loops: Any, granularity: Any, token_policy: Any, grad_steps: Any) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise TypeError(f"tokens must be a (B, T) int64 tensor, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                        f"{tuple(getattr(tokens, 'shape', ()))}")
    for name, value in (("max_loops", max_loops), ("min_loops", min_loops)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_loops < min_loops:
        raise ValueError(f"max_loops={max_loops} < min_loops={min_loops}; need max_loops >= "
                         "min_loops")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity not in controller.granularities:
        raise ValueError(f"controller {controller.name!r} supports granularity "
                         f"{controller.granularities}, not {granularity!r}")
    if token_policy not in TOKEN_POLICIES:
        raise ValueError(f"token_policy must be one of {TOKEN_POLICIES}, got {token_policy!r}")
    if grad_steps is not None and (isinstance(grad_steps, bool) or not isinstance(grad_steps, int)
                                   or grad_steps < 1):
        raise ValueError(f"grad_steps must be None or an integer >= 1, got {grad_steps!r}")
    if not callable(getattr(model, "step", None)):
        raise TypeError(f"model must be a LoopedModel, got {type(model).__name__}")


class _Run:
    """The mutable state of one ``run_loop`` call (kept in one place so steps stay short)."""

    def __init__(self, model: nn.Module, ctx: Any, z0: Tensor, controller: LoopController,
                 state: RunState, token_policy: str, record: bool,
                 grad_steps: int | None) -> None:
        self.model, self.ctx_full, self.controller, self.state = model, ctx, controller, state
        planned = controller.planned_loops(state.max_loops)
        self.planned, self.granularity, self.record = planned, state.granularity, record
        self.static = controller.capabilities.static
        self.keep_step_logits = controller.capabilities.keeps_step_logits(state.training)
        self.frozen = token_policy == "frozen"
        self.grad_from = 0 if grad_steps is None else max(0, planned - grad_steps)
        self.batch, self.seq_len = z0.shape[0], z0.shape[1]
        self.unit = state.unit
        # The running rows: their original indices, state, context and running tokens.
        self.rows = torch.arange(self.batch, device=z0.device)
        self.z, self.ctx = z0, ctx
        self.tok_active: Tensor | None = None
        if self.granularity == "token":
            self.tok_active = torch.ones(self.unit, dtype=torch.bool, device=z0.device)
        self.exit_state = z0
        self.depth = torch.zeros(self.unit, dtype=torch.long, device=z0.device)
        self.executed: Any = 0
        self.readout_tokens = 0
        self.steps_run = 0
        self.traces: dict[str, list[Tensor]] = {}
        self.active_counts: list[Any] = []
        self.states: list[Tensor] = [z0.detach()] if record else []
        self.step_logits: list[Tensor] = []
        self.z0 = z0

    # -- the step ------------------------------------------------------------------------------
    def _grad_context(self, k: int) -> Any:
        if self.grad_from and k < self.grad_from:
            return torch.no_grad()
        return contextlib.nullcontext()

    def _step(self, k: int) -> Tensor:
        masked = self.frozen and k > 0 and not self.static
        active = self.tok_active if masked else None
        with self._grad_context(k):
            if active is None:
                return self.model.step(self.z, self.ctx, k)
            return self.model.step(self.z, self.ctx, k, active=active)

    def execute_static(self) -> None:
        """``fixed``: no views, no decisions, no host syncs: as close to a bare loop as it gets."""
        for k in range(self.planned):
            z_new = self._step(k)
            if self.record:
                self._record_step(z_new, self.z, {})
            else:
                self.active_counts.append(self.batch)
            self.z = z_new
        self.steps_run = self.planned
        per_row = self.seq_len if self.granularity == "token" else 1
        self.executed = self.batch * self.planned * per_row
        self.exit_state = self.z
        self.depth.fill_(self.planned)

    def execute_driven(self) -> None:
        """``solver``: loop 0 here on the whole batch, then the controller's own solve."""
        z1 = self._step(0)
        self.executed = self.batch
        self._record_step(z1, self.z, {})
        self.z, self.steps_run = z1, 1
        self.exit_state = z1
        self.depth.fill_(1)
        if self.planned <= 1:
            return
        solution = self.controller.drive(self.model, self.ctx_full, z1, self.planned, self.record)
        self.exit_state = solution.z
        self.depth = 1 + solution.steps.to(self.depth.device, torch.long)
        self.executed += int(solution.evaluations)
        residuals = solution.residuals.transpose(0, 1).float()  # (K_solver, B)
        self.steps_run = 1 + residuals.shape[0]
        self.active_counts.extend((~residuals.isnan()).sum(dim=1).tolist())
        nan_row = torch.full_like(residuals[:1], math.nan)
        self.traces["solver_residual"] = list(torch.cat([nan_row, residuals]))
        if "residual" in self.traces:  # recorded: loop 0's residual, none for solver steps
            self.traces["residual"] += [nan_row[0]] * residuals.shape[0]
        if self.record and solution.states is not None:
            # states[j] is the iterate of each sample's j-th evaluation (states[0] = z_1);
            # after a sample stopped the solver repeats its last iterate: NaN here instead.
            stopped = torch.arange(residuals.shape[0], device=residuals.device).unsqueeze(1) >= \
                solution.steps.to(residuals.device).unsqueeze(0)  # (K_solver, B)
            shape = (*stopped.shape, *([1] * (solution.states.dim() - 2)))
            iterates = solution.states.detach().masked_fill(stopped.view(shape), math.nan)
            self.states.extend(iterates[1:])

    def execute(self) -> None:
        """The adaptive loop: decide, compact, scatter back."""
        min_loops = self.state.min_loops
        for k in range(self.planned):
            z_new = self._step(k)
            self._count_executed(k)
            view = StepView(self.model, self.ctx, k, z_new, self.z, self.rows, self.granularity,
                            self.tok_active, self.planned)
            stop = self.controller.decide(view)
            if self.keep_step_logits:
                self.step_logits.append(self._scatter_full(view.logits(), math.nan))
            self.readout_tokens += view.readout_tokens
            self._record_step(z_new, self.z, view.logged, view)
            self.z = z_new
            self.steps_run = k + 1
            last = k + 1 >= self.planned
            if last:
                stop = None
            elif stop is None or k + 1 < min_loops:
                continue
            if not self._exit(stop, k + 1) or last:
                break

    def _count_executed(self, k: int) -> None:
        if self.tok_active is None:
            self.executed += self.z.shape[0]
        elif self.frozen and k > 0:
            self.executed += self.tok_active.sum()
        else:
            self.executed += self.tok_active.numel()

    # -- exits and compaction ------------------------------------------------------------------
    def _exit(self, stop: Tensor | None, loops: int) -> bool:
        """Apply this step's exits (``stop=None`` means: everyone still running exits now).

        Returns whether any row is still running.
        """
        if self.exit_state.dtype != self.z.dtype:  # autocast: steps may return bf16
            self.exit_state = self.exit_state.to(self.z.dtype)
        if self.tok_active is None:
            leaving = torch.ones_like(self.rows, dtype=torch.bool) if stop is None else stop
            if not bool(leaving.any()):
                return True
            done = leaving.nonzero().squeeze(1)
            self.exit_state = self.exit_state.index_put((self.rows[done],), self.z[done])
            self.depth[self.rows[done]] = loops
            return self._compact(~leaving)
        newly = self.tok_active if stop is None else stop & self.tok_active
        if not bool(newly.any()):
            return True
        exits = torch.where(newly.unsqueeze(-1), self.z, self.exit_state[self.rows])
        self.exit_state = self.exit_state.index_put((self.rows,), exits)
        self.depth[self.rows] = torch.where(newly, loops, self.depth[self.rows])
        self.tok_active = self.tok_active & ~newly
        return self._compact(self.tok_active.any(dim=1))

    def _compact(self, keep: Tensor) -> bool:
        if bool(keep.all()):
            return True
        kept = keep.nonzero().squeeze(1)
        if kept.numel() == 0:
            return False
        self.rows, self.z = self.rows[kept], self.z[kept]
        self.ctx = self.ctx.select(kept)
        if self.tok_active is not None:
            self.tok_active = self.tok_active[kept]
        return True

    # -- traces --------------------------------------------------------------------------------
    def _scatter_full(self, values: Tensor, fill: float) -> Tensor:
        """Running-row values (n, ...) -> full batch (B, ...) with ``fill`` elsewhere."""
        if values.shape[0] == self.batch:
            return values
        full = values.new_full((self.batch, *values.shape[1:]), fill)
        return full.index_put((self.rows,), values)

    def _record_step(self, z_new: Tensor, z_old: Tensor, logged: dict[str, Tensor],
                     view: StepView | None = None) -> None:
        running = self.rows.numel() if self.tok_active is None else self.tok_active.sum()
        self.active_counts.append(running)
        if self.record:
            if view is None:
                view = StepView(self.model, self.ctx, 0, z_new, z_old, self.rows,
                                self.granularity, self.tok_active, self.planned)
            logged = {"residual": view.residual(), **logged}
            self.states.append(self._scatter_full(z_new.detach(), math.nan))
        for name, value in logged.items():
            value = value.float()
            if self.tok_active is not None:
                if value.dim() == 1:
                    value = value.unsqueeze(1).expand(-1, self.seq_len)
                value = value.masked_fill(~self.tok_active, math.nan)
            self.traces.setdefault(name, []).append(self._scatter_full(value, math.nan))

    def _stacked_traces(self) -> dict[str, Tensor]:
        trace: dict[str, Tensor] = {}
        for name, values in self.traces.items():
            if len(values) < self.steps_run:  # logged from a later step on: pad the start
                pad = [torch.full_like(values[0], math.nan)] * (self.steps_run - len(values))
                values = pad + values
            trace[name] = torch.stack(values)  # (K, B) or (K, B, T)
        trace["active"] = torch.tensor([int(c) for c in self.active_counts], dtype=torch.long)
        return trace

    # -- the output ----------------------------------------------------------------------------
    def draft(self) -> LoopDraft:
        logits = None
        if not self.controller.capabilities.sets_logits(self.state.training):
            logits = self.model.readout(self.exit_state, self.ctx_full)
            self.readout_tokens += self.batch * self.seq_len
        return LoopDraft(
            logits=logits, depth=self.depth, executed=int(self.executed),
            trace=self._stacked_traces(),
            states=torch.stack(self.states) if self.record else None,  # (K+1, B, T, D)
            step_logits=torch.stack(self.step_logits) if self.step_logits else None,
            max_loops=self.state.max_loops, granularity=self.granularity,
            training=self.state.training)

    def flops(self, executed: int) -> float:
        try:
            per_token = float(self.model.flops_per_token_step(self.seq_len))
        except NotImplementedError:
            per_token = math.nan
        tokens_per = 1 if self.granularity == "token" else self.seq_len
        readout = 2.0 * self.model.d_model * self.model.vocab_size * self.readout_tokens
        return executed * per_token * tokens_per + readout
