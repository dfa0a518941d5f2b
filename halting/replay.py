"""``replay_loop``: a controller's run read off an already-unrolled trajectory.

Evaluation unrolls every model once on the whole batch (``z_0 .. z_K``, kept for the fixed sweep
and the verdicts) and then runs each adaptive controller at several budgets. When the model's
step is a deterministic function of the state (every model in eval mode: dropout off; a random
initial state is drawn once, before the loop), the state a running row reaches at loop k does not
depend on which other rows are still running, so a controller's decisions can be replayed over
the stored states instead of stepping the model again: the driver below is ``run_loop``'s own
adaptive loop (``halting.loop._Run``) with one difference — step k returns the stored
``z_{k+1}`` of the running rows instead of calling ``model.step``. Views, decisions, exits,
compaction (the context is re-selected as in a real run, so ``readout`` and ``halt_logit`` see the
same rows), traces, readouts and the cost accounting (``executed``, ``flops``: what running it
costs) are the same code.

What is replayable (``replayable``): sample granularity, evaluation mode, a controller that
decides per step — not ``static`` (``fixed`` is read off the trajectory directly) and not
``drives_loop`` (``solver`` runs its own iteration and must run the model). Token granularity is
not: under the ``frozen`` policy a halted token changes what the others compute.

A controller that drives its own loop (``solver``) is never replayed: ``drive_from_unroll`` runs
it for real — every solver iteration calls ``model.step`` — and takes only loop 0, the step
``run_loop`` runs on the whole batch before handing over to the solver, from the stored ``z_1``
(the same step on the same batch and state), so the model is not run a second time on it.

Exactness: replay gives what ``run_loop`` gives as long as a step of a sub-batch computes, row by
row, the same numbers as a step of the whole batch. Matrix products on CPU do (each output row
depends only on its own input row); ``tests/halting/test_replay.py`` checks decisions, depths,
logits and traces against ``run_loop`` for every replayable controller.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from halting.base import GRANULARITIES, LoopController, LoopOutput, RunState, build_controller
from halting.loop import _Run, set_run_mode


def replayable(controller: LoopController, granularity: str = "sample") -> bool:
    """Whether ``replay_loop`` can stand in for ``run_loop`` with this controller."""
    caps = controller.capabilities
    return granularity == "sample" and not caps.static and not caps.drives_loop


class _ReplayRun(_Run):
    """``run_loop``'s adaptive loop, stepping through stored states instead of the model."""

    def __init__(self, stored: Tensor, *args: Any) -> None:
        super().__init__(*args)
        self.stored = stored  # (K+1, B, T, D)

    def _step(self, k: int) -> Tensor:
        z_next = self.stored[k + 1]
        return z_next if self.rows.numel() == self.batch else z_next.index_select(0, self.rows)


def replay_loop(model: nn.Module, ctx: Any, states: Tensor,
                controller: LoopController | str | dict, *, max_loops: int, min_loops: int = 1,
                granularity: str = "sample", record: bool = False) -> LoopOutput:
    """What ``run_loop(model, tokens, controller, max_loops=...)`` returns, from stored states.

    Args:
        model: the ``models.LoopedModel`` that produced ``states`` (read out, halt logits).
        ctx: its ``LoopContext`` for the whole batch, as the unroll left it (``model.prepare``
            of the same tokens, step 0 run on the whole batch).
        states: (K+1, B, T, D) ``z_0 .. z_K`` of the whole batch in the dtype the steps return,
            with K >= the loops the controller plans.
        controller: a replayable controller (see ``replayable``) or what ``build_controller``
            accepts.
        max_loops, min_loops, granularity, record: as for ``run_loop``.

    Raises:
        ValueError: the controller is not replayable, the model is in training mode, or the
            trajectory is shorter than the controller's plan.
    """
    controller = build_controller(controller)
    if granularity not in GRANULARITIES or not replayable(controller, granularity):
        raise ValueError(f"controller {controller.name!r} at granularity {granularity!r} cannot "
                         "be replayed (static, drives its own loop, or token granularity); use "
                         "run_loop")
    if model.training:
        raise ValueError("replay_loop needs the model in eval mode (training steps are not "
                         "a function of the stored states); call model.eval() or use run_loop")
    training = set_run_mode(controller, model, "auto")
    controller.ensure_bound(model)
    planned = controller.planned_loops(max_loops)
    if not isinstance(states, Tensor) or states.dim() != 4 or states.shape[0] < planned + 1:
        raise ValueError(f"states must be (K+1, B, T, D) with K >= {planned} loops, got "
                         f"{tuple(getattr(states, 'shape', ()))}")
    state = _begin(controller, states, max_loops, min_loops, granularity, training)
    run = _ReplayRun(states, model, ctx, states[0], controller, state, "frozen", record, None)
    with torch.no_grad():
        run.execute()
    return _complete(run, controller)


def _begin(controller: LoopController, states: Tensor, max_loops: int, min_loops: int,
           granularity: str, training: bool) -> RunState:
    """The ``RunState`` of a run over the stored ``states``, after ``controller.begin``."""
    state = RunState(batch=states.shape[1], seq_len=states.shape[2], max_loops=max_loops,
                     min_loops=max(min_loops, controller.min_loops()), granularity=granularity,
                     device=states.device, training=training)
    controller.begin(state)
    return state


def _complete(run: _Run, controller: LoopController) -> LoopOutput:
    """The finished run's ``LoopOutput``, as ``run_loop`` completes it."""
    draft = run.draft()
    controller.finish(draft)
    out = draft.complete(controller.name)
    out.flops = run.flops(out.executed)
    return out


class _StoredLoopZero(_Run):
    """``run_loop``'s driven path (``execute_driven``) with loop 0 read off the stored ``z_1``."""

    def __init__(self, z1: Tensor, *args: Any) -> None:
        super().__init__(*args)
        self.z1 = z1

    def _step(self, k: int) -> Tensor:
        return self.z1 if k == 0 else super()._step(k)


def drive_from_unroll(model: nn.Module, ctx: Any, states: Tensor,
                      controller: LoopController | str | dict, *, max_loops: int,
                      min_loops: int = 1, granularity: str = "sample",
                      record: bool = False) -> LoopOutput:
    """What ``run_loop(model, tokens, controller, max_loops=...)`` returns for a controller that
    drives its own loop (``solver``), run for real from the stored loop 0 (see module docstring).

    Args:
        model: the ``models.LoopedModel`` that produced ``states``, in eval mode.
        ctx: its ``LoopContext`` for the whole batch as the unroll left it (step 0 run on the
            whole batch); not modified (the solver's steps write a copy of its cache).
        states: (K+1, B, T, D) ``z_0 .. z_K`` with K >= 1, in the dtype the steps return, from
            the initial state ``run_loop`` starts from (``experiments.evaluate.measure
            .same_start``).
        controller: a controller that ``drives_loop``, or what ``build_controller`` accepts.
        max_loops, min_loops, granularity, record: as for ``run_loop``.

    Raises:
        ValueError: the controller does not drive its loop, the model is in training mode, or
            ``states`` holds no loop.
    """
    controller = build_controller(controller)
    if not controller.capabilities.drives_loop or granularity not in controller.granularities:
        raise ValueError(f"controller {controller.name!r} at granularity {granularity!r} does not "
                         "drive its own loop; use replay_loop or run_loop")
    if model.training:
        raise ValueError("drive_from_unroll needs the model in eval mode (a training step is "
                         "not the stored one); call model.eval() or use run_loop")
    if not isinstance(states, Tensor) or states.dim() != 4 or states.shape[0] < 2:
        raise ValueError(f"states must be (K+1, B, T, D) with K >= 1 loops, got "
                         f"{tuple(getattr(states, 'shape', ()))}")
    training = set_run_mode(controller, model, "auto")
    controller.ensure_bound(model)
    # the solver's steps store their keys / values in the context's cache: in a copy of it
    ctx = replace(ctx, cache=dict(ctx.cache), extras=dict(ctx.extras))
    state = _begin(controller, states, max_loops, min_loops, granularity, training)
    run = _StoredLoopZero(states[1], model, ctx, states[0], controller, state, "frozen", record,
                          None)
    with torch.no_grad():
        run.execute_driven()
    return _complete(run, controller)
