"""Benchmarks of the fixed-point machinery: ``solvers``, ``per_sample``, ``memory``.

* ``solvers``: every solver of ours (``fixedpoint.SOLVERS`` except the ``torchdeq.*``
  pass-throughs) against torchdeq 0.1.0's own ``fixed_point_iter``, ``anderson`` and ``broyden``
  (called directly through ``torchdeq.solver.get_solver``, with their defaults) on four problems
  f(z, x) = tanh(W z + x), fp32, every map called in the natural DEQ form
  ``solve(f, z0, inputs=(x,))`` (torchdeq gets the same f closed over x). Three of batch 64 x 256,
  x ~ 0.1 N(0, 1) (REFERENCE.md §3): W Gaussian scaled to spectral norm 0.9; 0.95 x an orthogonal
  matrix; a symmetric matrix with eigenvalues evenly spread in [-0.99, 0.99]; and the DEQ layer of
  issue 10: W Gaussian scaled to spectral norm 0.97 (0.97-contractive), x ~ N(0, 1), batch
  128 x 512.

  Same TRUE tolerance for both libraries. Each problem has one true per-sample residual of the
  returned z, computed here from scratch: for the three 64 x 256 problems the RMS residual
  ``||f(z) - z||_2 / sqrt(D)`` <= ``1e-5``; for the 0.97 layer the relative residual
  ``||f(z) - z||_2 / ||f(z)||_2`` <= ``1e-5``. A solver's own stopping tolerance is stated in its
  own norm: ours runs ``stop_mode="abs"`` (RMS: our abs residual is ``||f(z) - z|| / sqrt(D)``)
  resp. ``"rel"`` (``||f(z) - z|| / max(||f(z)||, 1e-3 ||f(z0)||)``, the true relative residual
  whenever ``||f(z)|| >= 1e-3 ||f(z0)||``); torchdeq's ``abs`` is the plain 2-norm, so it gets
  ``tol * sqrt(D)``, and its ``rel`` is ``||f(x) - x|| / (||f(x)|| + 1e-9)`` at its iterate x,
  so it gets ``tol`` (it returns its lowest-residual image f(x), not x). Because a solver's stop
  and its returned z need not agree exactly, each solver is calibrated before timing: it is run
  with its converted tolerance times 2^-k, k = 0, 1, ..., 7, and the first (largest) tolerance
  whose returned z meets the true tolerance on every sample (0.1% slack for the re-check's
  rounding) is the one it is timed with (column ``tol factor`` = 2^-k). A solver that meets it
  at no k is out; "best" of a library is its fastest (or fewest-evaluation) solver that met it.
  Function evaluations are counted by wrapping f (rows evaluated / B, so a per-sample stop shows
  as a fraction of a batch-wide step); torchdeq's stop is batch-wide.
  ``torchdeq.simple_fixed_point_iter`` is left out: it has no stopping rule (it always runs
  ``max_iter`` steps) and calls ``f(z, tau=...)``.
  Bookkeeping: ``solve(solver="fixed_point_iter")`` for N iterations that cannot reach the
  tolerance, against a bare ``for _ in range(N): z = f(z)`` loop of the same f; torchdeq's
  ``fixed_point_iter`` beside it.
* ``per_sample``: f_i(z) = tanh(r_i Q z + x_i) with Q orthogonal and contraction factors r_i
  spread evenly over [0.5, 0.99]: per-sample stopping against stopping the batch when its
  slowest sample has converged (see ``bench_per_sample`` for how the batch-wide side is run).
* ``memory``: peak memory of one training step (forward solve of the ``deq`` model's step map,
  readout, cross-entropy, backward) with ``backward="implicit"`` and ``"unroll"`` at 8, 16, 32 and
  64 forward iterations (peak measured as described in ``experiments.bench.core``).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchdeq.solver import get_solver as torchdeq_solver

from experiments.bench.core import (
    BENCHMARKS,
    BenchConfig,
    Row,
    alternate,
    make_row,
    peak_memory,
    ratios,
    saved_tensor_bytes,
)
from experiments.bench.loop import random_tokens, tiny_model
from fixedpoint.problem import Problem as FixedPointProblem
from fixedpoint.solve import SOLVERS, solve

TORCHDEQ_SOLVERS = ("fixed_point_iter", "anderson", "broyden")
BATCH, DIM, TOL, MAX_ITER = 64, 256, 1e-5, 500
CALIBRATION = 8  # tolerance factors 2^0 .. 2^-7 tried until the returned z meets the true tol
# x ~ 0.1 N(0, 1): tanh stays near its linear range, so the contraction is close to the nominal
# 0.9 / 0.95 / 0.99 (with x ~ N(0, 1) saturation roughly halves it and every problem is easy).
INJECT_SCALE = 0.1


@dataclass
class Problem:
    """f(z, x) = tanh(scale * (z @ W^T) + x), rows independent; x (and scale) are ``inputs``."""

    name: str
    weight_t: Tensor  # (D, D), W transposed
    inject: Tensor  # (B, D)
    scale: Tensor | None = None  # (B, 1) per-sample contraction factors
    stop_mode: str = "abs"  # "abs": true residual in RMS units; "rel": relative to ||f(z)||
    tol: float = TOL  # the true tolerance every returned z must meet

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        """The per-sample inputs ``solve(..., inputs=...)`` slices to the active rows."""
        return (self.inject,) if self.scale is None else (self.inject, self.scale)

    def f(self, z: Tensor, inject: Tensor, scale: Tensor | None = None) -> Tensor:
        """The natural DEQ map ``f(z, x)``: ``solve`` passes x sliced to the rows of z."""
        mixed = z @ self.weight_t  # (n, D)
        if scale is not None:
            mixed = mixed * scale
        return torch.tanh(mixed + inject)

    def plain(self, z: Tensor) -> Tensor:
        """The whole-batch map ``f(z)`` closing over x (torchdeq and bare loops)."""
        return self.f(z, *self.inputs)

    def residual(self, z: Tensor) -> Tensor:
        """(B,) true residual of z in the problem's norm: ||f(z) - z||_2 / sqrt(D) (``abs``) or
        ||f(z) - z||_2 / ||f(z)||_2 (``rel``), computed in float64 from f(z) itself."""
        with torch.no_grad():
            fz = self.plain(z).double().flatten(1)
            diff = (fz - z.double().flatten(1)).norm(dim=1)
            if self.stop_mode == "rel":
                return diff / fz.norm(dim=1)
            return diff / math.sqrt(z[0].numel())


def _orthogonal(dim: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def make_problems(device: torch.device, seed: int) -> list[Problem]:
    """The three problems of issue #6 (float32, batch 64 x 256) and issue 10's 0.97 layer."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
    gaussian *= 0.9 / torch.linalg.matrix_norm(gaussian, ord=2)
    orthogonal = 0.95 * _orthogonal(DIM, generator)
    basis = _orthogonal(DIM, generator)
    symmetric = basis @ torch.diag(torch.linspace(-0.99, 0.99, DIM, dtype=torch.float64)) \
        @ basis.T
    inject = INJECT_SCALE * torch.randn(BATCH, DIM, generator=generator)
    problems = [Problem(name, w.T.contiguous().float().to(device), inject.to(device))
                for name, w in (("gaussian 0.9", gaussian), ("0.95 orthogonal", orthogonal),
                                ("symmetric ±0.99", symmetric))]
    return problems + [layer_problem(device, seed)]


def layer_problem(device: torch.device, seed: int, batch: int = 128, dim: int = 512) -> Problem:
    """Issue 10's DEQ layer: tanh(W z + x), ||W||_2 = 0.97, x ~ N(0, 1), relative tol 1e-5."""
    generator = torch.Generator().manual_seed(seed + 10)
    weight = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    weight *= 0.97 / torch.linalg.matrix_norm(weight, ord=2)
    inject = torch.randn(batch, dim, generator=generator)
    return Problem(f"tanh 0.97-contractive {batch}x{dim}", weight.T.contiguous().float().to(device),
                   inject.to(device), stop_mode="rel")


def ours(name: str, problem: Problem, f: Callable[..., Tensor], *, tol: float = TOL,
         max_iter: int = MAX_ITER) -> Callable[[], Tensor]:
    """Our solver ``name`` with ``tol`` in our norm of ``problem.stop_mode``."""
    z0 = torch.zeros_like(problem.inject)

    def run() -> Tensor:
        with torch.no_grad():
            return solve(f, z0, inputs=problem.inputs, solver=name, tol=tol, max_iter=max_iter,
                         stop_mode=problem.stop_mode).z

    return run


def theirs(name: str, problem: Problem, f: Callable[[Tensor], Tensor], *, tol: float = TOL,
           max_iter: int = MAX_ITER) -> Callable[[], Tensor]:
    """torchdeq's solver ``name``; ``tol`` in OUR norm, converted to torchdeq's (docstring)."""
    z0 = torch.zeros_like(problem.inject)
    solver = torchdeq_solver(name)
    their_tol = tol * math.sqrt(z0[0].numel()) if problem.stop_mode == "abs" else tol

    def run() -> Tensor:
        with torch.no_grad():
            return solver(f, z0, max_iter=max_iter, tol=their_tol,
                          stop_mode=problem.stop_mode)[0]

    return run


class Counter:
    """Wraps a map and counts the rows it is evaluated on."""

    def __init__(self, problem: Problem) -> None:
        self.problem, self.rows = problem, 0

    def f(self, z: Tensor, *inputs: Tensor) -> Tensor:
        self.rows += z.shape[0]
        return self.problem.f(z, *inputs)

    def plain(self, z: Tensor) -> Tensor:
        self.rows += z.shape[0]
        return self.problem.plain(z)


Runner = Callable[..., Callable[[], Tensor]]


def _solver_cases(problem: Problem) -> dict[str, tuple[Runner, Callable[..., Tensor], bool]]:
    """``{"ours:anderson": (runner factory, map to time, counts with Counter.f?), ...}``."""
    cases: dict[str, tuple[Runner, Callable[..., Tensor], bool]] = {}
    for name in [n for n in SOLVERS.names() if not n.startswith("torchdeq.")]:
        cases[f"ours:{name}"] = (functools.partial(ours, name), problem.f, True)
    for name in TORCHDEQ_SOLVERS:
        cases[f"torchdeq:{name}"] = (functools.partial(theirs, name), problem.plain, False)
    return cases


def calibrate(runner: Runner, problem: Problem, native: bool) -> dict[str, Any]:
    """The largest tolerance ``problem.tol * 2^-k`` whose returned z meets the true tolerance.

    Returns the table entry: ``tol factor`` (``None`` when no k met it), ``achieved`` (largest
    true residual of the returned z at that tolerance, or at the last one tried),
    ``evaluations`` (rows evaluated / B in that run) and ``converged``.
    """
    batch = problem.inject.shape[0]
    for k in range(CALIBRATION):
        counter = Counter(problem)
        factor = 2.0 ** -k
        z = runner(problem, counter.f if native else counter.plain, tol=problem.tol * factor)()
        achieved = float(problem.residual(z).max())
        met = achieved <= problem.tol * (1 + 1e-3)
        if met:
            break
    return {"tol factor": factor if met else None, "evaluations": counter.rows / batch,
            "achieved": achieved, "converged": met}


def _best(table: list[dict[str, Any]], library: str, key: str) -> dict[str, Any] | None:
    eligible = [e for e in table if e["library"] == library and e["converged"]]
    return min(eligible, key=lambda e: e[key]) if eligible else None


def _problem_rows(problem: Problem, cfg: BenchConfig) -> list[Row]:
    table, timed = [], {}
    for label, (runner, f, native) in _solver_cases(problem).items():
        library, name = label.split(":")
        entry = {"library": library, "solver": name, **calibrate(runner, problem, native)}
        table.append(entry)
        if entry["converged"]:
            timed[label] = runner(problem, f, tol=problem.tol * entry["tol factor"])
    # the calibration runs above were the warm-up; one more call calibrates the timing
    times = alternate(timed, cfg, reps=3 if cfg.quick else None, warmup=1)
    for entry in table:
        label = f"{entry['library']}:{entry['solver']}"
        entry["median ms"] = 1e3 * statistics.median(times[label]) if label in times else math.nan
    batch, dim = problem.inject.shape
    config = {"problem": problem.name, "batch": batch, "dim": dim, "true tol": problem.tol,
              "norm": problem.stop_mode, "max_iter": MAX_ITER, "dtype": "float32"}
    raw = {"seconds": times, "table": table}
    rows = []
    for key, what in (("evaluations", "f evaluations"), ("median ms", "wall time")):
        mine, best = _best(table, "ours", key), _best(table, "torchdeq", key)
        compared = f"{problem.name}: {what}, our best / torchdeq best"
        if mine is None or best is None:
            rows.append(make_row("solvers", compared, [math.nan], "< 1", raw=raw, config=config,
                                 note="no solver met the true tolerance on the "
                                      f"{'our' if mine is None else 'torchdeq'} side"))
            continue
        compared += f" ({mine['solver']} / {best['solver']})"
        per_rep = [mine["evaluations"] / best["evaluations"]] if key == "evaluations" else \
            ratios(times, f"ours:{mine['solver']}", f"torchdeq:{best['solver']}")
        rows.append(make_row("solvers", compared, per_rep, "< 1", raw=raw, config=config,
                             note=f"{mine['evaluations']:.1f} vs {best['evaluations']:.1f} "
                                  "evaluations per sample"))
    return rows


def _bookkeeping_rows(problem: Problem, cfg: BenchConfig) -> list[Row]:
    """fixed_point_iter for N iterations / a bare ``z = f(z)`` loop of N iterations."""
    iterations, tol = 100, 1e-9  # 0.95-orthogonal: far from 1e-9 after 100 iterations
    z0 = torch.zeros_like(problem.inject)

    def bare() -> Tensor:
        with torch.no_grad():
            z = z0
            for _ in range(iterations):
                z = problem.plain(z)
            return z

    ours_counter, their_counter = Counter(problem), Counter(problem)
    ours("fixed_point_iter", problem, ours_counter.f, tol=tol, max_iter=iterations)()
    theirs("fixed_point_iter", problem, their_counter.plain, tol=tol, max_iter=iterations)()
    times = alternate({
        "bare": bare,
        "ours": ours("fixed_point_iter", problem, problem.f, tol=tol, max_iter=iterations),
        "torchdeq": theirs("fixed_point_iter", problem, problem.plain, tol=tol,
                           max_iter=iterations),
    }, cfg)
    config = {"problem": problem.name, "batch": BATCH, "dim": DIM, "iterations": iterations}
    raw = {"seconds": times, "rows_evaluated": {"ours": ours_counter.rows,
                                                "torchdeq": their_counter.rows}}
    note = (f"rows evaluated: ours {ours_counter.rows}, torchdeq {their_counter.rows}, "
            f"bare {BATCH * iterations}")
    return [
        make_row("solvers", f"fixed_point_iter bookkeeping: ours ({iterations} it) / bare loop",
                 ratios(times, "ours", "bare"), "<= 1.3", raw=raw, config=config, note=note),
        make_row("solvers", f"fixed_point_iter bookkeeping: torchdeq ({iterations} it) / bare "
                 "loop", ratios(times, "torchdeq", "bare"), None, raw=raw, config=config,
                 note=note),
    ]


@BENCHMARKS.register("solvers")
def bench_solvers(cfg: BenchConfig) -> list[Row]:
    """Our solvers vs torchdeq 0.1.0's on three problems, and fixed_point_iter's bookkeeping."""
    problems = make_problems(cfg.device, cfg.seed)
    rows: list[Row] = []
    for problem in problems:
        rows.extend(_problem_rows(problem, cfg))
    rows.extend(_bookkeeping_rows(problems[1], cfg))
    return rows


# -- per_sample ----------------------------------------------------------------------------------
def spread_problem(device: torch.device, seed: int) -> Problem:
    """f_i(z) = tanh(r_i Q z + x_i), Q orthogonal, r_i evenly spread over [0.5, 0.99]."""
    generator = torch.Generator().manual_seed(seed + 7)
    weight = _orthogonal(DIM, generator)
    scale = torch.linspace(0.5, 0.99, BATCH)[:, None]  # (B, 1)
    inject = INJECT_SCALE * torch.randn(BATCH, DIM, generator=generator)
    return Problem("rates 0.5..0.99", weight.T.contiguous().float().to(device), inject.to(device),
                   scale.to(device))


def batchwide(name: str, problem: Problem, iterations: int) -> Callable[[], Tensor]:
    """Our solver ``name`` with per-sample freezing disabled, run ``iterations`` steps.

    ``fixedpoint.problem.Problem(freeze=False)`` records residuals but freezes no row, so every
    row is evaluated every step: the batch-wide stop, with the slowest sample's step count as an
    oracle stopping point (its per-step "whole batch below tol?" check is not paid).
    """
    z0 = torch.zeros_like(problem.inject)
    solver = SOLVERS.get(name)

    def run() -> Tensor:
        with torch.no_grad():
            state = FixedPointProblem(problem.f, z0, tol=TOL, max_iter=iterations,
                                      stop_mode="abs", solver=name, freeze=False,
                                      inputs=problem.inputs)
            return solver(state).z

    return run


@BENCHMARKS.register("per_sample")
def bench_per_sample(cfg: BenchConfig) -> list[Row]:
    """Per-sample stopping / batch-wide stopping on samples with contraction 0.5..0.99.

    For ``fixed_point_iter`` and ``anderson``: f-evaluation rows (per-sample: the sum of the
    samples' steps; batch-wide: B x the largest, exact because rows never influence each other)
    and wall time against the same solver with freezing disabled (``batchwide``).
    """
    problem = spread_problem(cfg.device, cfg.seed)
    max_iter = 3000
    z0 = torch.zeros_like(problem.inject)
    config = {"problem": problem.name, "batch": BATCH, "dim": DIM, "tol": TOL,
              "stop_mode": "abs", "max_iter": max_iter}
    rows = []
    for name in ("fixed_point_iter", "anderson"):
        with torch.no_grad():
            solution = solve(problem.f, z0, inputs=problem.inputs, solver=name, tol=TOL,
                             max_iter=max_iter, stop_mode="abs")
        slowest = int(solution.steps.max())
        per_sample, batch_rows = int(solution.steps.sum()), BATCH * slowest
        raw = {"steps": solution.steps, "converged": int(solution.converged.sum())}
        note = (f"{per_sample} vs {batch_rows} rows; steps per sample "
                f"{int(solution.steps.min())}..{slowest}; {raw['converged']}/{BATCH} converged")
        rows.append(make_row("per_sample", f"{name}: f-evaluation rows, per-sample / batch-wide",
                             [per_sample / batch_rows], None, raw=raw, config=config, note=note))
        times = alternate({
            "per_sample": ours(name, problem, problem.f, max_iter=max_iter),
            "batch_wide": batchwide(name, problem, slowest),
        }, cfg, reps=3 if cfg.quick else None, warmup=1)
        rows.append(make_row(
            "per_sample", f"{name}: wall time, per-sample / batch-wide (freezing off)",
            ratios(times, "per_sample", "batch_wide"), None, raw={"seconds": times},
            config=config, note="batch-wide: our solver with Problem(freeze=False) run for the "
                                "slowest sample's steps"))
    return rows


# -- memory --------------------------------------------------------------------------------------
def deq_training_step(model: Any, tokens: Tensor, iterations: int, backward: str) -> int:
    """One training step through a forward solve of the ``deq`` model's step map.

    Returns the largest number of forward iterations any sample ran (the tolerance is set out of
    reach so that every sample runs ``iterations``).
    """
    ctx = model.prepare(tokens)
    z0 = model.init_state(ctx)

    def f(z: Tensor, sub: Any) -> Tensor:  # sub: ctx sliced to z's rows by solve
        return model.step(z, sub, 1)

    solution = solve(f, z0, inputs=(ctx,), solver="fixed_point_iter", tol=1e-30,
                     max_iter=iterations, stop_mode="abs", backward=backward)
    logits = model.readout(solution.z, ctx)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return int(solution.steps.max())


def _memory_of_step(model: Any, tokens: Tensor, iterations: int, backward: str,
                    cfg: BenchConfig) -> tuple[int, int, int]:
    """(peak bytes, saved-tensor bytes, iterations run) of one DEQ training step."""
    ran: list[int] = []

    def step() -> None:
        with cfg.autocast():
            ran.append(deq_training_step(model, tokens, iterations, backward))

    peak = peak_memory(step, cfg.device)
    saved = saved_tensor_bytes(step)
    return peak, saved, ran[-1]


@BENCHMARKS.register("memory")
def bench_memory(cfg: BenchConfig) -> list[Row]:
    """Peak memory of a DEQ training step: implicit vs unroll at 8, 16, 32, 64 iterations."""
    size = dict(batch=8, seq_len=32, d_model=64) if cfg.quick else \
        dict(batch=16, seq_len=64, d_model=64)
    model = tiny_model("deq", cfg, train=True, d_model=size["d_model"], n_layers=1,
                       vocab_size=64, max_seq_len=size["seq_len"])
    tokens = random_tokens(64, size["batch"], size["seq_len"], cfg)
    for backward in ("implicit", "unroll"):  # warm-up: lazy initialisations do not count
        deq_training_step(model, tokens, 8, backward)
    table, peaks = [], {}
    for iterations in (8, 16, 32, 64):
        entry: dict[str, Any] = {"iterations": iterations}
        for backward in ("implicit", "unroll"):
            peak, saved, ran = _memory_of_step(model, tokens, iterations, backward, cfg)
            peaks[(backward, iterations)] = peak
            entry[f"{backward} MiB"] = peak / 2**20
            entry[f"{backward} saved MiB"] = saved / 2**20
            entry[f"{backward} ran"] = ran
        entry["implicit / unroll"] = entry["implicit MiB"] / entry["unroll MiB"]
        table.append(entry)
    config = {"arch": "deq", "n_layers": 1, "solver": "fixed_point_iter", **size}
    raw = {"table": table, "method": "torch.profiler [memory] events (CPU) / "
           "max_memory_allocated (CUDA)"}
    growth = peaks[("implicit", 64)] / peaks[("implicit", 8)]
    versus = peaks[("implicit", 64)] / peaks[("unroll", 64)]
    return [
        make_row("memory", "implicit backward: peak at 64 iterations / at 8", [growth],
                 "<= 1.1", raw=raw, config=config,
                 note=f"{peaks[('implicit', 8)] / 2**20:.2f} -> "
                      f"{peaks[('implicit', 64)] / 2**20:.2f} MiB"),
        make_row("memory", "peak at 64 iterations: implicit / unroll", [versus], "<= 0.2",
                 raw=raw, config=config,
                 note=f"{peaks[('unroll', 64)] / 2**20:.2f} MiB unrolled"),
    ]
