"""Measuring one trained model on one batch: tensors only (``rows`` turns them into table rows).

Every loop here is ``halting.run_loop`` — the fixed sweep is one ``run_loop(..., "fixed",
record=True)`` whose recorded states are read out at every loop, and every controller is one
``run_loop(..., controller, record=True)``. Two measurements call the model's own pieces because
they are not a loop: the spectral radius differentiates the step map ``z -> step(z, ctx, K)`` at
the final state, and the per-loop attention is captured by re-running ``step`` on the first
samples with ``prepare(..., capture_attention=True)`` (``run_loop`` has no capture switch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

RESIDUAL_TRACE_SAMPLES = 64  # samples whose per-loop residual trace is stored per run
# per-loop state diagnostics of the whole batch: the trajectory already is float32 and float64
# would copy it; values differ by float32 rounding only (bound: tests/experiments/
# test_diagnostics_fast.py)
DIAGNOSTICS_DTYPE = torch.float32


@dataclass
class Trajectory:
    """The unrolled fixed sweep of one model on one batch."""

    states: Tensor          # (K+1, B, T, D) float
    ctx: Any                # the LoopContext as the loop left it (run_loop(..., return_ctx=True))
    correct: Tensor         # (K, B) bool, fixed(k) correct for k = 1..K
    loss: Tensor            # (K, B)
    lens_logits: Tensor     # (K, n, T, V) readouts of the first n samples (logit lens)
    step_dtype: torch.dtype = torch.float32  # what the model's steps return (autocast: bf16)


@dataclass
class ControllerRun:
    """One controller at one budget on the batch."""

    name: str
    budget: int
    out: Any                # halting.LoopOutput (record=True)
    correct: Tensor         # (B,) bool, on the CPU
    loss: Tensor            # (B,)
    depth: Tensor           # (B,) loops used (per sample: the deepest token at token granularity)
    expected_depth: Tensor | None = None  # (B,) sum_n n p_n of a geometric halting rule, else None


def score(task: Any, batch: Any, logits: Tensor) -> dict[str, Tensor]:
    """The task's scores; a sample whose logits are not finite (diverged) is never correct
    (argmax over NaN would pick an arbitrary token)."""
    scores = dict(task.score(logits, batch))
    finite = torch.isfinite(logits).flatten(start_dim=1).all(dim=1)  # (B,)
    scores["correct"] = scores["correct"] & finite.to(scores["correct"].device)
    return scores


@torch.no_grad()
def unroll(model: Any, task: Any, batch: Any, loops: int) -> Trajectory:
    """Run ``fixed(loops)`` with every state recorded and score ``readout(z_k)`` for every k.

    ``fixed(k)``'s logits are ``readout(z_k)`` (``halting`` tests that ``run_loop(fixed(k))``
    equals ``model(x, loops=k)``), so the whole sweep costs one unroll.
    """
    from halting import run_loop

    # the loop's own context (loop 0's cache filled): no second prepare + loop 0 to rebuild it
    out = run_loop(model, batch.tokens, "fixed", max_loops=loops, record=True, return_ctx=True)
    dtype = out.states.dtype
    states = out.states.float()  # (K+1, B, T, D)
    ctx = out.ctx
    n_lens = min(batch.tokens.shape[0], RESIDUAL_TRACE_SAMPLES)
    correct, loss, lens = [], [], []
    for k in range(1, loops + 1):
        logits = model.readout(states[k].to(dtype), ctx).float()  # (B, T, V)
        scores = score(task, batch, logits)
        correct.append(scores["correct"].cpu())
        loss.append(scores["loss"].float().cpu())
        lens.append(logits[:n_lens].cpu())
    return Trajectory(states, ctx, torch.stack(correct), torch.stack(loss), torch.stack(lens),
                      dtype)


def classify_trajectory(traj: Trajectory) -> dict[str, Any]:
    """``fixedpoint.classify`` verdicts of each sample's and each token's whole trajectory."""
    from fixedpoint import classify

    states = traj.states.cpu()
    return {"sample": classify(states), "token": classify(states, per_token=True)}


def prefix_verdicts(traj: Trajectory, budget: int, verdicts: dict[str, Any]) -> Any:
    """Per-sample verdicts of the trajectory's first ``budget + 1`` states."""
    from fixedpoint import classify

    if budget == traj.states.shape[0] - 1:
        return verdicts["sample"]
    return classify(traj.states[: budget + 1].cpu())


def spectral(model: Any, traj: Trajectory, samples: int, iters: int) -> Tensor:
    """(B,) spectral radius of ``z -> step(z, ctx, K)`` at the final state; NaN outside the first
    ``samples`` samples and for diverged ones."""
    from fixedpoint import spectral_radius

    batch, loops = traj.states.shape[1], traj.states.shape[0] - 1
    radius = torch.full((batch,), float("nan"))
    n = min(samples, batch)
    if n == 0:
        return radius
    # A diverged trajectory has no Jacobian to speak of: its rows are evaluated at 0 instead
    # (rows are independent, so the others' estimates are exactly those of a clean batch)
    # and reported as NaN.
    final = traj.states[-1, :n].to(next(model.parameters()).dtype)
    finite = torch.isfinite(final).flatten(start_dim=1).all(dim=1)  # (n,)
    if not finite.any():
        return radius
    final = torch.where(finite.view(-1, *[1] * (final.dim() - 1)), final, 0.0)
    sub_ctx = traj.ctx.select(torch.arange(n, device=final.device))

    def step_map(z: Tensor, ctx: Any) -> Tensor:
        return model.step(z, ctx, loops)  # the map applied after the last recorded step

    with torch.enable_grad():
        estimate = spectral_radius(step_map, final, iters, inputs=(sub_ctx,),
                                   method="vjp").float().cpu()
    radius[:n] = torch.where(finite.cpu(), estimate, math.nan)
    return radius


def finite_samples(traj: Trajectory) -> Tensor:
    """(B,) bool: the sample's whole trajectory stayed finite."""
    from experiments.evaluate.diagnostics import finite_per_sample

    return finite_per_sample(traj.states).cpu()


@torch.no_grad()
def attention(model: Any, batch: Any, samples: int, loops: int,
              finite: Tensor) -> list[dict[str, Any]] | None:
    """Attention of the first ``samples`` samples over ``loops`` loops (finite samples only)."""
    n = min(samples, batch.tokens.shape[0])
    keep = finite[:n]  # (n,) samples whose trajectory stayed finite
    if n == 0 or not keep.any():
        return None
    ctx = model.prepare(batch.tokens[:n], capture_attention=True)
    z = model.init_state(ctx)
    for k in range(loops):
        z = model.step(z, ctx, k)
    return [dict(entry, probs=entry["probs"].float().cpu()[keep])  # (n', H, T, T)
            for entry in ctx.attention or []]


def per_loop_diagnostics(traj: Trajectory, attention_maps: list[dict[str, Any]] | None,
                         finite: Tensor) -> pd.DataFrame:
    """Long (loop, metric, value) rows: ``per_loop_table``, the logit lens, accuracy per loop and
    every diagnostic registered in ``experiments.evaluate.registry.DIAGNOSTICS``."""
    from experiments.evaluate.diagnostics import logit_lens_kl, per_loop_table
    from experiments.evaluate.registry import registered_rows

    # samples that diverged would make every batch mean NaN: they are left out here and
    # show up as the `diverging` verdict instead
    table = per_loop_table(traj.states.cpu(), attention=attention_maps, dtype=DIAGNOSTICS_DTYPE)
    logits = traj.lens_logits[:, finite[: traj.lens_logits.shape[1]]]  # (K, n', T, V)
    lens = logit_lens_kl(logits, logits[-1]) if logits.shape[1] else torch.empty(0)
    extra = [(k + 1, "logit_lens_kl", float(v)) for k, v in enumerate(lens.tolist())]
    extra += [(k + 1, "accuracy_at_loop", float(c.float().mean()))
              for k, c in enumerate(traj.correct)]  # loops 1..K of the unrolled trajectory
    extra += registered_rows(traj.states.cpu())
    return pd.concat([table, pd.DataFrame(extra, columns=["loop", "metric", "value"])])


def can_replay(model: Any, batch: Any, traj: Trajectory) -> bool:
    """Whether a controller's run equals its replay over ``traj`` (``halting.replay``)."""
    return same_start(model, batch, traj)


def same_start(model: Any, batch: Any, traj: Trajectory) -> bool:
    """Whether ``traj`` is the trajectory every controller run sees: the stored states are in the
    steps' own dtype and ``run_loop`` would start from the same initial state (a random one,
    ``recurrent_depth``'s, is drawn anew by every run). The check draws nothing: torch's RNG is
    restored after it."""
    devices = [traj.states.device] if traj.states.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        z0 = model.init_state(model.prepare(batch.tokens))
    return traj.step_dtype == traj.states.dtype == z0.dtype and torch.equal(z0, traj.states[0])


@torch.no_grad()
def run_controller(model: Any, task: Any, batch: Any, name: str, controller: Any, budget: int,
                   granularity: str, traj: Trajectory | None = None,
                   unrolled: Trajectory | None = None) -> ControllerRun:
    """``run_loop(model, tokens, controller, max_loops=budget, record=True)``, scored.

    With ``traj`` (only when ``can_replay``), a controller that decides step by step is replayed
    over the stored trajectory instead (``halting.replay``: the same output, tested); the solver
    and anything else that runs its own loop always runs the model, from the stored loop 0 when
    there is a trajectory (``halting.replay.drive_from_unroll``: the same output, tested).
    ``unrolled`` (only when ``same_start``; defaults to ``traj``) is the trajectory the expected
    depth and the solver's loop 0 are read from.
    """
    from halting import run_loop
    from halting.replay import drive_from_unroll, replay_loop, replayable

    start = traj if unrolled is None else unrolled
    if traj is not None and replayable(controller, granularity) and \
            traj.states.shape[0] > controller.planned_loops(budget):
        out = replay_loop(model, traj.ctx, traj.states, controller, max_loops=budget,
                          granularity=granularity, record=True)
    elif start is not None and controller.capabilities.drives_loop and \
            granularity in controller.granularities:
        out = drive_from_unroll(model, start.ctx, start.states.to(start.step_dtype), controller,
                                max_loops=budget, granularity=granularity, record=True)
    else:
        out = run_loop(model, batch.tokens, controller, max_loops=budget,
                       granularity=granularity, record=True)
    scores = score(task, batch, out.logits.float())
    depth = out.depth if out.depth.dim() == 1 else out.depth.max(dim=1).values
    return ControllerRun(name, budget, out, scores["correct"].cpu(), scores["loss"].float().cpu(),
                         depth.cpu(), expected_depth(model, controller, budget, granularity,
                                                  traj if unrolled is None else unrolled))


def expected_depth(model: Any, controller: Any, budget: int, granularity: str,
                   traj: Trajectory | None) -> Tensor | None:
    """(B,) expected depth sum_n n p_n of a geometric halting rule (PonderNet, Ouro gate, halt
    token) at ``budget``, read off the stored trajectory; ``None`` for any other controller, at
    token granularity, or without a replayable trajectory. A sampled exit (PonderNet's
    inference) is one draw from p: its rank correlation with difficulty carries the sampling
    noise, the expected depth does not — the report shows both."""
    if traj is None or granularity != "sample" or traj.states.shape[0] <= budget or \
            not callable(getattr(controller, "expected_depth", None)):
        return None
    states = traj.states[: budget + 1].to(traj.step_dtype)
    return controller.expected_depth(model, traj.ctx, states).float().cpu()
