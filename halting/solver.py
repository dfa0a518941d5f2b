"""``solver``: treat the looped block as a map and solve for its fixed point (DEQ-style).

After loop 0 (run by ``run_loop`` on the whole batch: it writes PLT's loop-1 cache and, for
injected models, turns the random / zero initial state into a first iterate), the map
``f(z) = model.step(z, ctx, k=1)`` — the block at a fixed loop index, i.e. every later loop — is
handed to ``fixedpoint.solve`` (Bai, Kolter & Koltun 2019, "Deep Equilibrium Models"). The solver
stops each sample independently and calls ``f(z, ctx.select(idx))`` on the rows still running; the
context is re-selected only when that row set changes.

The exit state is the solver's last evaluated iterate (``Solution.z``); with ``record=True``
``states`` holds z_0 then the solver's iterates (z_1 first), NaN once a sample stopped, and the
``solver_residual`` trace the solver's own residuals (``fixedpoint.problem`` norms).

Accounting: a sample's ``depth`` is 1 + its solver steps (f evaluations); ``executed`` is the
whole batch for loop 0 plus every row the solver evaluated f on in the forward solve (backward
evaluations of implicit or phantom gradients are not counted). Training uses the solver's
``backward`` mode (``implicit``, ``phantom``, ``one_step``, ``unroll``). ``run_loop``'s
``min_loops`` is not enforced: a sample converged after one solver step stops there.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from common.constants import BACKWARDS, STOP_MODES
from halting.base import CONTROLLERS, Capabilities, LoopController, check_choice, check_range


@CONTROLLERS.register("solver")
class SolverController(LoopController):
    """Drive ``fixedpoint.solve`` over ``model.step`` with per-sample stopping.

    Args:
        solver: a registered solver name (``fixed_point_iter``, ``anderson``, ``broyden``,
            ``torchdeq.<name>``).
        tol: residual tolerance (see ``fixedpoint.solve``'s ``stop_mode``).
        max_iter: most solver steps; ``None`` = ``max_loops - 1`` (depth never exceeds the cap).
        backward: gradient mode for training.
        stop_mode: ``rel`` or ``abs`` residual.
        solver_kwargs: extra keyword arguments for ``fixedpoint.solve`` (e.g. Anderson's ``m``).
    """

    name = "solver"
    capabilities = Capabilities(granularities=("sample",), drives_loop=True)

    def __init__(self, solver: str = "anderson", tol: float = 1e-3, max_iter: int | None = None,
                 backward: str = "implicit", stop_mode: str = "rel",
                 solver_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(solver, str) or not solver:
            raise ValueError(f"solver: solver must be a solver name, got {solver!r}")
        check_range("solver: tol", tol, 0.0, float("inf"), low_open=True, high_open=True)
        if max_iter is not None:
            check_range("solver: max_iter", max_iter, 1, float("inf"), integer=True)
        check_choice("solver: backward", backward, BACKWARDS)
        check_choice("solver: stop_mode", stop_mode, STOP_MODES)
        from fixedpoint.solve import NOT_UNROLLABLE, SOLVERS

        if solver not in SOLVERS:
            raise KeyError(f"solver: unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
        if backward == "unroll" and solver.startswith(NOT_UNROLLABLE):
            raise ValueError(f"solver: backward='unroll' cannot record solver {solver!r} "
                             "(it updates its history in place); use solver=fixed_point_iter "
                             f"or another backward of {BACKWARDS}")
        self.solver, self.tol, self.max_iter = solver, tol, max_iter
        self.backward, self.stop_mode = backward, stop_mode
        self.solver_kwargs = dict(solver_kwargs or {})

    def drive(self, model: nn.Module, ctx: Any, z1: Tensor, max_loops: int,
              record: bool) -> Any:
        """Solve from the first loop's state ``z1`` (the declared ``drives_loop`` step: run_loop
        runs loop 0, then calls this); returns ``fixedpoint.Solution``."""
        from fixedpoint.solve import solve

        def block(z: Tensor, sub: Any) -> Tensor:  # sub: ctx sliced to the active rows
            return model.step(z, sub, 1)

        max_iter = self.max_iter if self.max_iter is not None else max_loops - 1
        max_iter = min(max_iter, max_loops - 1)
        return solve(block, z1, inputs=(ctx,), solver=self.solver, tol=self.tol,
                     max_iter=max_iter, stop_mode=self.stop_mode, backward=self.backward,
                     record=record, **self.solver_kwargs)

    def hparams(self) -> dict[str, Any]:
        return {"solver": self.solver, "tol": self.tol, "max_iter": self.max_iter,
                "backward": self.backward, "stop_mode": self.stop_mode}

