"""Pass-through to torchdeq 0.1.0's own solvers (``torchdeq.<name>``), reported as a ``Solution``.

Runs locuslab/torchdeq's ``anderson``, ``broyden``, ``fixed_point_iter`` and
``simple_fixed_point_iter`` unchanged on the same problem, so the native solvers can be compared
with the peer side by side. What is and is not comparable:

* The stop is torchdeq's: batch-wide (``trace.max() < tol`` in its own norm: ``abs`` is the plain
  2-norm, converted here from our RMS tolerance by ``sqrt(n)``; ``rel`` divides by ``||f(z)||``,
  not by our trajectory scale). ``simple_fixed_point_iter`` never stops early.
* Every f call torchdeq makes is recorded through a wrapper, so ``steps`` (the same for every
  sample: the number of f calls torchdeq actually made, including its two Anderson warm-up calls
  and Broyden's initial one) and ``residuals`` (our norm, one column per call, no sentinel, no
  padding) mean exactly what they mean for the native solvers.
* ``z`` is, as for the native solvers, the last point f was evaluated at (or the lowest-residual
  one with ``return_best``), recovered from the calls; torchdeq itself would return its
  lowest-residual image ``f(x)``. ``status`` is ``converged`` when the residual of the returned
  ``z`` is ``<= tol`` in our norm, ``diverged`` when any residual of the sample was non-finite.
* ``simple_fixed_point_iter`` calls ``func(x, tau=tau)``; the wrapper applies the damping itself,
  so any plain ``f`` works (torchdeq alone fails on a plain callable, REFERENCE.md section 3).
* Unknown options raise ``TypeError`` (torchdeq silently ignores them). torchdeq's Anderson does
  not run in bf16/fp16 on CPU (``lu_cpu``); the error it raises is passed on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fixedpoint.problem import CONVERGED, DIVERGED, MAX_ITER, Problem, Solution

OPTIONS = {
    "anderson": ("m", "lam", "tau"),
    "broyden": ("LBFGS_thres", "ls"),
    "fixed_point_iter": ("tau",),
    "simple_fixed_point_iter": ("tau",),
}


def _torchdeq_solver(name: str) -> Any:
    from torchdeq.solver import get_solver  # only this pass-through imports torchdeq

    return get_solver(name)


def run_torchdeq(problem: Problem, *, name: str, **options: Any) -> Solution:
    """Run torchdeq's solver ``name`` on ``problem`` (built with ``freeze=False``).

    Args:
        problem: the problem; its f is called on the whole batch at every torchdeq call.
        name: one of ``OPTIONS``.
        **options: torchdeq's own solver options (listed in ``OPTIONS``).
    """
    if name not in OPTIONS:
        raise KeyError(f"unknown torchdeq solver {name!r}; known: {', '.join(sorted(OPTIONS))}")
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        raise TypeError(
            f"torchdeq.{name} got unknown option(s) {unknown}; allowed: {list(OPTIONS[name])}"
        )
    if problem.freeze:
        raise ValueError("the torchdeq pass-through needs a Problem built with freeze=False")

    def func(x: Tensor, tau: float | None = None) -> Tensor:
        fx = problem.evaluate(x)
        problem.observe(x, fx)
        return fx if tau is None else tau * fx + (1.0 - tau) * x

    tol = problem.tol
    if problem.stop_mode == "abs":  # torchdeq's abs residual is the plain 2-norm
        tol = tol * math.sqrt(max(problem.z0[0].numel(), 1)) if problem.z0.shape[0] else tol
    solver = _torchdeq_solver(name)
    with torch.no_grad():
        solver(
            func, problem.z0, max_iter=problem.max_iter, tol=tol,
            stop_mode=problem.stop_mode, **options,
        )
    solution = problem.finish()
    solution.status = _status(solution, problem.return_best)
    return solution


def _status(solution: Solution, best: bool) -> Tensor:
    """Status in our norm: converged if the returned z has residual <= tol; inf ever -> diverged."""
    residuals = solution.residuals  # (B, K), K >= 1: torchdeq always calls f
    returned = residuals.min(1).values if best else residuals[:, -1]
    status = torch.full_like(solution.status, MAX_ITER)
    status[returned <= solution.tol] = CONVERGED
    status[torch.isinf(residuals).any(1)] = DIVERGED
    return status
