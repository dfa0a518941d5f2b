"""``solve(f, z0)``: per-sample fixed-point solving with a choice of solver and gradient.

The entry point of ``fixedpoint`` (DESIGN.md, contracts): validates the call, runs a registered
solver on a ``Problem`` (per-sample stopping, ``fixedpoint.problem``), and attaches the chosen
backward (``fixedpoint.backward``). Solvers are looked up in ``SOLVERS``, the project's one
``Registry``; ``register_solver`` adds one. Built in: ``fixed_point_iter``, ``anderson``,
``broyden`` (``fixedpoint.solvers``) and ``torchdeq.<name>`` for torchdeq 0.1.0's own
``anderson``, ``broyden``, ``fixed_point_iter``, ``simple_fixed_point_iter``
(``fixedpoint._torchdeq``, imported only when used).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from common.constants import BACKWARDS, STOP_MODES
from common.registry import Registry
from fixedpoint import backward as grads
from fixedpoint._torchdeq import OPTIONS as TORCHDEQ_OPTIONS
from fixedpoint._torchdeq import run_torchdeq
from fixedpoint.maps import RowMap
from fixedpoint.problem import STATUS_NAMES, Problem, Solution
from fixedpoint.solvers import anderson, broyden, fixed_point_iter

__all__ = [
    "NOT_UNROLLABLE", "SOLVERS", "STATUS_NAMES", "Problem", "Solution", "register_solver", "solve",
]

SolverFn = Callable[..., Solution]
SOLVERS: Registry[SolverFn] = Registry("solver")
SOLVERS.register("fixed_point_iter", fixed_point_iter)
SOLVERS.register("anderson", anderson)
SOLVERS.register("broyden", broyden)
for _name in TORCHDEQ_OPTIONS:
    SOLVERS.register(f"torchdeq.{_name}", functools.partial(run_torchdeq, name=_name))

# Solvers whose forward pass writes history buffers in place (or detaches, like torchdeq's):
# autograd cannot record them, so backward="unroll" refuses them.
NOT_UNROLLABLE = ("anderson", "broyden", "torchdeq.")


def register_solver(name: str, fn: SolverFn) -> SolverFn:
    """Add a solver ``fn(problem: Problem, **options) -> Solution`` under ``name``.

    The solver follows the loop documented on ``Problem`` (``evaluate``, ``observe``, compact on
    the returned positions, ``finish``) and gets per-sample stopping, residual traces and
    recording for free.
    """
    if not callable(fn):
        raise TypeError(f"solver {name!r} must be callable, got {type(fn).__name__}")
    return SOLVERS.register(name, fn)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _validate(f: Any, z0: Any, tol: Any, max_iter: Any, stop_mode: Any, backward: Any) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a torch.Tensor of shape (B, ...), got {type(z0).__name__}")
    if z0.dim() < 1 or not z0.is_floating_point():
        raise ValueError(
            f"z0 must be a floating tensor of shape (B, ...), got shape {tuple(z0.shape)} "
            f"dtype {z0.dtype}"
        )
    if z0.shape[0] > 0 and z0[0].numel() == 0:
        raise ValueError(f"z0 must have at least one value per sample, got shape {tuple(z0.shape)}")
    if not _is_number(tol) or not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"unknown stop_mode {stop_mode!r}; choose one of {list(STOP_MODES)}")
    if backward not in BACKWARDS:
        raise ValueError(f"unknown backward {backward!r}; choose one of {list(BACKWARDS)}")


def _run(
    name: str, f: Callable[..., Tensor] | RowMap, z0: Tensor, settings: dict[str, Any],
    options: dict
) -> Solution:
    """Run solver ``name`` on a fresh ``Problem``; unknown options become a TypeError."""
    fn = SOLVERS.get(name)
    problem = Problem(f, z0, solver=name, freeze=not name.startswith("torchdeq."), **settings)
    if z0.shape[0] == 0:
        return problem.finish()
    try:
        return fn(problem, **options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"solver {name!r}: {err}") from None
        raise


def solve(
    f: Callable[..., Tensor],
    z0: Tensor,
    *,
    inputs: Any = None,
    solver: str = "anderson",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop_mode: str = "rel",
    backward: str = "implicit",
    record: bool = False,
    return_best: bool = False,
    diverge_factor: float = 1e6,
    adjoint_solver: str | None = None,
    adjoint_tol: float | None = None,
    adjoint_max_iter: int | None = None,
    phantom_steps: int = 5,
    phantom_tau: float = 0.5,
    **solver_kwargs: Any,
) -> Solution:
    """Find z* = f(z*) for every sample of the batch, each stopping on its own.

    ``f`` maps a (B, ...) tensor to the same shape and must treat rows independently: row i of
    f(z) may depend only on row i of z (no batch statistics). Once a sample's residual is
    ``<= tol`` it is frozen and f is evaluated only on the remaining rows. Per-sample data
    (the ``x`` of ``tanh(W z + x)``) is passed as ``inputs=(x, ...)`` and f is called
    ``f(z_active, x[active], ...)``: the library slices every input to the active rows. A plain
    ``f(z)`` that closes over (B, ...) tensors also works: it is detected on the first call on
    fewer rows and evaluated on the whole batch from then on, the stopped rows frozen
    (``fixedpoint.maps``). The deprecated ``f(z, rows)`` form still works. f must be
    deterministic (no dropout sampling between calls).

    ``converged`` guarantees, at the returned z of that sample, ``||f(z) - z|| <= tol * scale``
    with scale ``sqrt(n)`` for ``abs`` (RMS units) and ``max(||f(z)||, 1e-3 ||f(z0)||)`` for
    ``rel`` (``fixedpoint.problem``); nothing the solver visited on the way enters the scale.

    Args:
        f: the map, ``f(z, *inputs)``.
        z0: (B, ...) initial state; its dtype and device are kept.
        inputs: per-sample inputs of f: (B, ...) tensors, or objects with ``select(rows)``.
        solver: a name in ``SOLVERS``: ``anderson``, ``broyden``, ``fixed_point_iter``,
            ``torchdeq.<name>``, or one added with ``register_solver``.
        tol: residual tolerance (RMS units for ``abs``; see ``fixedpoint.problem``).
        max_iter: most f evaluations per sample.
        stop_mode: ``"abs"`` (||f(z)-z|| / sqrt(n)) or ``"rel"`` (||f(z)-z|| divided by
            max(||f(z)||, 1e-3 ||f(z0)||) at the same z).
        backward: gradient when grad is enabled and f's parameters or inputs require it:
            ``implicit`` (adjoint fixed point), ``phantom`` (``phantom_steps`` damped steps with
            ``phantom_tau``), ``one_step`` (phantom with 1 step, tau 1), ``unroll`` (autograd
            through the forward iterations themselves: plain/damped iteration only, memory grows
            with the iterations). Only ``unroll`` lets the value depend on how z0 was made.
        record: keep the trajectory in ``Solution.states`` (K, B, ...).
        return_best: return each sample's lowest-residual iterate instead of its last.
        diverge_factor: a residual above this times the sample's first one marks it diverged.
        adjoint_solver: solver of the implicit adjoint (default: ``solver`` when native, else
            ``anderson``).
        adjoint_tol: adjoint tolerance (default ``tol``); adjoint_max_iter: default ``max_iter``.
        phantom_steps: k for ``phantom``. phantom_tau: damping for ``phantom``.
        **solver_kwargs: the solver's own options (e.g. ``m``, ``beta``, ``lam`` for Anderson;
            ``tau`` for fixed_point_iter; ``memory``, ``variant`` for Broyden).

    Returns:
        A ``Solution``; ``residuals[b, j]`` is the residual of the iterate of sample b's j-th f
        evaluation, NaN after it stopped.

    Example:
        >>> W = 0.5 * torch.eye(4); x = torch.randn(8, 4)
        >>> sol = solve(lambda z, x: torch.tanh(z @ W + x), torch.zeros(8, 4), inputs=(x,))
        >>> sol.status_names[0], int(sol.steps.max()) <= 50
        ('converged', True)
    """
    _validate(f, z0, tol, max_iter, stop_mode, backward)
    options = {"phantom_steps": phantom_steps, "phantom_tau": phantom_tau,
               "adjoint_tol": adjoint_tol, "adjoint_max_iter": adjoint_max_iter}
    grads.check_backward_options(options)
    settings = {"tol": float(tol), "max_iter": max_iter, "stop_mode": stop_mode,
                "record": record, "return_best": return_best, "diverge_factor": diverge_factor}
    SOLVERS.get(solver)  # unknown name -> KeyError before any work
    call = RowMap(f, z0.shape[0], inputs)  # one map for the forward solve and the backward
    if backward == "unroll":
        if solver.startswith(NOT_UNROLLABLE):
            raise ValueError(
                f"backward='unroll' records the forward iterations with autograd; solver "
                f"{solver!r} updates its history in place. Use solver='fixed_point_iter' "
                f"(or a registered out-of-place solver), or another backward of {list(BACKWARDS)}"
            )
        return _run(solver, call, z0, settings, solver_kwargs)
    with torch.no_grad():
        solution = _run(solver, call, z0.detach(), settings, solver_kwargs)
    if not torch.is_grad_enabled() or z0.shape[0] == 0:
        return solution
    call.anchor(solution.z)
    if backward == "implicit":
        adjoint = _adjoint_solver(solver, adjoint_solver, settings, adjoint_tol, adjoint_max_iter)
        solution.z = grads.attach_implicit(call, solution.z, solution, adjoint)
    else:
        steps, tau = (1, 1.0) if backward == "one_step" else (phantom_steps, phantom_tau)
        solution.z = grads.attach_phantom(call, solution.z, steps, tau)
    return solution


def _adjoint_solver(
    forward: str,
    name: str | None,
    settings: dict[str, Any],
    tol: float | None,
    max_iter: int | None,
) -> grads.AdjointSolve:
    """``adjoint(map, v0) -> Solution`` solving ``g = map(g, rows)`` per sample, no grad."""
    if name is None:
        name = forward if forward in ("anderson", "broyden", "fixed_point_iter") else "anderson"
    SOLVERS.get(name)
    adjoint_settings = dict(settings, record=False, return_best=True)
    if tol is not None:
        adjoint_settings["tol"] = float(tol)
    if max_iter is not None:
        adjoint_settings["max_iter"] = max_iter

    def adjoint(adjoint_map: Callable[..., Tensor], v0: Tensor) -> Solution:
        with torch.no_grad():
            return _run(name, adjoint_map, v0, adjoint_settings, {})

    return adjoint
