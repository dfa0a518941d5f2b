"""Per-sample bookkeeping shared by every fixed-point solver, and the ``Solution`` it produces.

A solver sees a ``Problem``: it calls ``evaluate`` to apply ``f`` to the rows that are still
active and ``observe`` to report each evaluated iterate. ``observe`` measures the residual, freezes
the rows that converged or diverged, and returns the positions of the rows that continue so the
solver can compact its own history (Anderson's and Broyden's per-row buffers). Frozen rows are
never evaluated again: per-sample early exit saves real compute, unlike torchdeq 0.1.0's batch-wide
``trace.max() < tol`` stop (REFERENCE.md section 3).

Residuals (one per f evaluation, RMS units so that a tolerance means the same at every size):

* ``abs``: ``||f(z) - z||_2 / sqrt(n)`` with ``n`` the number of elements of one sample.
* ``rel``: ``||f(z_k) - z_k||_2 / max(||f(z_k)||_2, 1e-3 ||f(z_0)||_2)``: the residual relative
  to the image of the very iterate it is measured at, so a ``converged`` status is a statement
  about the returned z alone: ``||f(z) - z|| <= tol max(||f(z)||, 1e-3 ||f(z_0)||)``. No scale
  from elsewhere in the trajectory enters: a running maximum of ``||f(z_j)||`` (the previous rule)
  let one overshoot of Anderson or Broyden inflate the denominator ~700x and certify wrong answers
  (46 of 64 samples on a non-normal affine map). The floor, fixed by the first image before the
  solver has moved, keeps a fixed point at 0 reachable (REFERENCE.md section 4: dividing by
  ``||f(z)||`` alone never converges there); it is floored again at ``1e-30 sqrt(n)``.

Divergence: a sample whose residual is not finite (NaN/Inf in ``f(z)``), or exceeds
``diverge_factor`` times its first residual, is marked ``diverged`` and frozen at its last
iterate; every other sample continues exactly as if it had never been in the batch.

Cost per iteration: the residual norm, one clamp of the residuals between the tolerance and
each row's blow-up limit, and one comparison of the clamped residuals with the originals, which
is the iteration's only host sync (a row at or below ``tol``, above its limit, or NaN changes
under the clamp). Both stops are therefore checked every iteration, and the rows are compacted
in the very iteration they stop: stopped rows are never evaluated again, and no iterate is kept
beyond the current one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fixedpoint.maps import RowMap, as_row_map

STATUS_NAMES = ("converged", "max_iter", "diverged")
CONVERGED, MAX_ITER, DIVERGED = 0, 1, 2


@functools.lru_cache(maxsize=64)
def _least_above(threshold: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The least value of ``dtype`` above ``threshold``, as a 0-d tensor: for any residual r of
    that dtype, ``r < it`` exactly when ``r <= threshold`` (compared as Python floats). Cached:
    the tensor is only ever read (expanded and sliced, never written)."""
    below = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    if float(below) > threshold:  # rounded up: step back to the largest value <= threshold
        below = torch.nextafter(below, torch.tensor(-math.inf, dtype=dtype))
    return torch.nextafter(below, torch.tensor(math.inf, dtype=dtype)).to(device)


@dataclass
class Solution:
    """What a solve returns, with the same meaning for every solver.

    Attributes:
        z: (B, ...) each sample's last evaluated iterate (the point whose residual is its last
            finite column of ``residuals``), or its lowest-residual iterate with ``return_best``.
        steps: (B,) long, the number of f evaluations each sample actually used.
        status: (B,) int8 codes into ``STATUS_NAMES``: 0 converged, 1 max_iter, 2 diverged.
        residuals: (B, K) residual of each evaluated iterate, K = ``steps.max()``; NaN after a
            sample stopped (``inf`` marks a non-finite f(z)). No sentinel column, no padding.
        states: (K, B, ...) when recorded: ``states[j, b]`` is the iterate at which sample b made
            its j-th f evaluation; after a sample stopped, its last iterate is repeated (the state
            it is frozen at), while its residual there is NaN (no evaluation was made).
        evaluations: total rows f was evaluated on during the forward solve (the sum of
            ``steps`` for native solvers; a plain f(z) that closes over batch tensors runs on
            the whole batch, counted as such; backward re-attachment evaluations are not
            counted).
        stop_mode: ``"abs"`` or ``"rel"``: the norm of ``residuals`` (see the module docstring).
        tol: the tolerance a residual had to reach to count as converged.
        solver: the registered name of the solver that produced this.
        adjoint: after an implicit backward pass, the adjoint solve's own ``Solution``.
    """

    z: Tensor
    steps: Tensor
    status: Tensor
    residuals: Tensor
    states: Tensor | None = None
    evaluations: int = 0
    stop_mode: str = "rel"
    tol: float = 0.0
    solver: str = ""
    adjoint: Solution | None = field(default=None, repr=False)

    @property
    def status_names(self) -> list[str]:
        """Status of each sample as a string from ``STATUS_NAMES``."""
        return [STATUS_NAMES[int(code)] for code in self.status.tolist()]

    @property
    def converged(self) -> Tensor:
        """(B,) bool: which samples reached ``tol``."""
        return self.status == CONVERGED

    @property
    def nfe(self) -> int:
        """Length of the solver loop: the largest number of f evaluations any sample made."""
        return int(self.steps.max()) if self.steps.numel() else 0

    @property
    def final_residual(self) -> Tensor:
        """(B,) residual at each sample's last evaluation (NaN for a sample with no steps)."""
        if self.residuals.shape[1] == 0:
            return self.residuals.new_full((self.residuals.shape[0],), math.nan)
        last = (self.steps - 1).clamp_min(0).to(self.residuals.device)
        return self.residuals.gather(1, last[:, None]).squeeze(1)


class ResidualNorm:
    """Per-sample residual in the norm of ``stop_mode``; ``rel`` keeps its per-sample floor.

    ``__call__`` returns the residual in internal units (for ``abs`` the plain 2-norm, scaled to
    RMS by ``report`` only when the trace is assembled, so the hot loop saves one op).
    """

    def __init__(self, mode: str, sample_shape: torch.Size, dtype: torch.dtype) -> None:
        self.mode = mode
        self.dims = tuple(range(1, 1 + len(sample_shape))) or None
        numel = math.prod(sample_shape)
        self.rms_scale = 1.0 / math.sqrt(max(numel, 1))
        self.floor = 1e-30 * math.sqrt(max(numel, 1))
        low = dtype in (torch.float16, torch.bfloat16)
        self.norm_dtype = torch.float32 if low else None
        self._floor: Tensor | None = None  # rel: 1e-3 ||f(z_0)|| per sample, floored
        self.gap: Tensor | None = None  # f(z) - z of the latest call

    def _norm(self, x: Tensor) -> Tensor:
        if x.dim() == 1:  # state (B,): one scalar per sample
            return x.abs().to(self.norm_dtype or x.dtype)
        return torch.linalg.vector_norm(x, dim=self.dims, dtype=self.norm_dtype)

    def __call__(self, z: Tensor, fz: Tensor) -> Tensor:
        self.gap = fz - z  # kept for solvers that need the residual vector itself
        diff = self._norm(self.gap)
        if self.mode == "abs":
            return diff
        fz_norm = self._norm(fz)
        if self._floor is None:
            self._floor = (1e-3 * fz_norm).nan_to_num(self.floor, self.floor).clamp_min(self.floor)
        return diff / torch.maximum(fz_norm, self._floor)

    def threshold(self, tol: float) -> float:
        """``tol`` in internal units."""
        return tol / self.rms_scale if self.mode == "abs" else tol

    def report(self, residuals: Tensor) -> Tensor:
        """Internal units -> reported units (in place)."""
        return residuals.mul_(self.rms_scale) if self.mode == "abs" else residuals

    def select(self, keep: Tensor) -> None:
        if self._floor is not None:
            self._floor = self._floor[keep]


@dataclass
class _Segment:
    """Columns ``start..`` of the trace for one fixed active set ``rows``."""

    rows: Tensor
    start: int
    residuals: list[Tensor] = field(default_factory=list)
    states: list[Tensor] = field(default_factory=list)


class Problem:
    """One fixed-point problem ``z = f(z)`` being solved with per-sample stopping.

    The solver loop every native solver follows::

        z = problem.z0
        while not problem.done:
            fz = problem.evaluate(z)          # f on the active rows only
            keep = problem.observe(z, fz)     # residual, freezing; None when no row stopped
            if problem.done:
                break
            if keep is not None:              # compact z, fz and the solver's history
                z, fz = z[keep], fz[keep]
            z = next_iterate(z, fz)
        return problem.finish()

    Tensors passed to ``observe`` must not be modified in place afterwards (they are kept as the
    rows' last iterates and, with ``record``, as the trajectory).

    Args:
        f: the map, in any form of ``fixedpoint.maps`` (or a ``RowMap``).
        z0: (B, ...) initial state.
        tol: residual a sample must reach (``<=``) to be converged.
        max_iter: most f evaluations per sample.
        stop_mode: ``"abs"`` or ``"rel"`` (module docstring).
        record: keep every evaluated iterate for ``Solution.states``.
        return_best: return each sample's lowest-residual iterate instead of its last.
        diverge_factor: residual above this times the sample's first residual -> diverged.
        solver: name written into the ``Solution``.
        freeze: when False (batch-wide solvers such as torchdeq's), ``observe`` only records:
            no row is frozen and ``max_iter`` is the caller's business.
        inputs: per-sample inputs of ``f(z, *inputs)``, sliced to the active rows.
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        z0: Tensor,
        *,
        tol: float,
        max_iter: int,
        stop_mode: str,
        record: bool = False,
        return_best: bool = False,
        diverge_factor: float = 1e6,
        solver: str = "",
        freeze: bool = True,
        inputs: tuple | None = None,
    ) -> None:
        self.f = f
        self.z0 = z0
        self.tol, self.max_iter, self.stop_mode = tol, max_iter, stop_mode
        self.record, self.return_best = record, return_best
        self.diverge_factor, self.solver, self.freeze = diverge_factor, solver, freeze
        batch, device = z0.shape[0], z0.device
        self.call: RowMap = as_row_map(f, batch, inputs)
        self.rows = torch.arange(batch, device=device)
        self.k = 0
        self.evaluations = 0
        self.norm = ResidualNorm(stop_mode, z0.shape[1:], z0.dtype)
        self._threshold = self.norm.threshold(tol)
        self._limit: Tensor | None = None  # (A,) per-row blow-up limit of the residual
        self._low: Tensor | None = None  # (A,) the least residual value above the tolerance
        self._columns: list[Tensor] = []  # residuals of the current segment, one per iteration
        self._steps = torch.zeros(batch, dtype=torch.long, device=device)
        self._status = torch.full((batch,), MAX_ITER, dtype=torch.int8, device=device)
        self._segments = [_Segment(self.rows, 0)]
        self._frozen: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows, last, best)
        self._last: Tensor | None = None
        self._best_r: Tensor | None = None
        self._best_z: Tensor | None = None

    @property
    def active(self) -> int:
        """Number of rows still being iterated."""
        return self.rows.shape[0]

    @property
    def gap(self) -> Tensor | None:
        """``f(z) - z`` (A, ...) of the latest ``observe``, rows as before its compaction."""
        return self.norm.gap

    @property
    def done(self) -> bool:
        return self.k >= self.max_iter or self.rows.shape[0] == 0

    def evaluate(self, z: Tensor) -> Tensor:
        """``f`` on the active rows ``z`` (A, ...); checks the output and casts it to z's dtype."""
        fz = self.call(z, self.rows)
        if not isinstance(fz, Tensor) or fz.shape != z.shape or self.k == 0:
            self._check_output(z, fz)
        # a plain f(z) over batch tensors runs on every row once it is found out (fixedpoint.maps)
        self.evaluations += self.z0.shape[0] if self.call.whole_batch else z.shape[0]
        return fz if fz.dtype == z.dtype else fz.to(z.dtype)

    @staticmethod
    def _check_output(z: Tensor, fz: Any) -> None:
        """One clear error for an output that is not a tensor of z's shape on z's device."""
        if not isinstance(fz, Tensor):
            raise TypeError(f"f must return a Tensor, got {type(fz).__name__}")
        if fz.shape != z.shape:
            raise ValueError(
                f"f must return the shape of its input: expected {tuple(z.shape)}, "
                f"received {tuple(fz.shape)}"
            )
        if fz.device != z.device:  # checked on the first call (a map does not move devices)
            raise ValueError(f"f must return a tensor on its input's device: expected {z.device}, "
                             f"received {fz.device}")

    def observe(self, z: Tensor, fz: Tensor) -> Tensor | None:
        """Record the residual of iterate ``z`` (whose image is ``fz``) and freeze stopped rows.

        Every iteration costs the residual norm, one clamp and one comparison (the only host
        sync): a row at or below ``tol``, above its blow-up limit (``diverge_factor`` times its
        first residual) or NaN changes under ``clamp(residual, low, limit)``, with ``low`` the
        least residual value above the tolerance, so the common iteration where every row
        continues costs no more than that. ``gap`` holds ``fz - z`` for solvers that reuse it.

        Returns:
            ``None`` when every active row continues (the common case: nothing to compact), else
            the positions, within the current active rows, of the rows that continue.
        """
        if torch.is_grad_enabled():  # unroll: keep the bookkeeping out of the graph
            with torch.no_grad():
                residual = self.norm(z.detach(), fz.detach())
        else:
            residual = self.norm(z, fz)
        self._columns.append(residual)
        if self.record:
            self._segments[-1].states.append(z.detach())
        self._last = z
        if self.return_best:
            self._update_best(z, residual)
        self.k += 1
        if not self.freeze:
            return None
        if self._limit is None:  # first evaluation: NaN/Inf diverges, else set the blow-up limit
            return self._first(residual)
        if torch.equal(torch.clamp(residual, self._low, self._limit), residual):
            return None  # every row continues
        return self._check(residual)

    def _first(self, residual: Tensor) -> Tensor | None:
        """The first column: set each row's blow-up limit; a non-finite residual diverges."""
        top = torch.finfo(residual.dtype).max
        # clamped, a limit that overflows still catches inf; a row with residual 0 (whose limit
        # is NaN when diverge_factor is inf) stops here as converged
        self._limit = (residual * self.diverge_factor).clamp_max(top)
        self._low = _least_above(self._threshold, residual.dtype, residual.device) \
            .expand(residual.shape[0])
        if torch.equal(torch.clamp(residual, self._low[0], top), residual):
            return None  # every row is finite and above tol
        return self._check(residual, ~((residual > self._threshold) & torch.isfinite(residual)))

    def run_plain(self, tau: float) -> Solution:
        """``fixed_point_iter``'s loop ``z <- tau f(z) + (1 - tau) z`` with ``evaluate`` and
        ``observe`` inlined between events.

        The same columns, window, stops and ``Solution`` as the general loop (tested equal);
        only the per-iteration method calls are gone. Between two events (a row stops, or
        ``max_iter``) the active set is fixed, so the map is bound once to the sliced inputs
        and each iteration is: f, ``fz - z``, one norm, one clamp and one comparison (the sync).
        Used without grad, without ``record``/``return_best`` and for maps the fast path can
        bind; anything else takes the general loop.
        """
        z = self.z0
        fz = self.evaluate(z)  # first evaluation: output checks and the blow-up limit
        keep = self.observe(z, fz)
        dims, floor = self.norm.dims, None
        rel = self.stop_mode == "rel"
        vector_norm, maximum, clamp, equal = (torch.linalg.vector_norm, torch.maximum,
                                              torch.clamp, torch.equal)
        while not self.done:
            if keep is not None:
                z, fz = z[keep], fz[keep]
            z = fz if tau == 1.0 else torch.lerp(z, fz, tau)
            f = self.call.bind(self.rows)
            if f is None:  # a map the fast path cannot bind (e.g. plain f on a subset)
                fz = self.evaluate(z)
                keep = self.observe(z, fz)
                continue
            columns, low, limit = self._columns, self._low, self._limit
            left, shape, dtype = self.max_iter - self.k, z.shape, z.dtype
            floor = self.norm._floor if rel else None
            count, moved = 0, False
            gap = torch.empty_like(z)  # f(z) - z, written in place every iteration
            while True:
                fz = f(z)
                if not isinstance(fz, Tensor) or fz.shape != shape:
                    self._check_output(z, fz)
                if fz.dtype != dtype:
                    fz = fz.to(dtype)
                count += 1
                residual = vector_norm(torch.sub(fz, z, out=gap), dim=dims)
                if rel:
                    residual = residual / maximum(vector_norm(fz, dim=dims), floor)
                columns.append(residual)
                if not equal(clamp(residual, low, limit), residual):
                    moved = True  # some row stops at this iterate
                    break
                if count >= left:
                    break
                z = fz if tau == 1.0 else torch.lerp(z, fz, tau)
            self.k += count
            self.evaluations += count * z.shape[0]
            self._last = z
            self.call.settle(z)
            keep = self._check(residual) if moved else None
        return self.finish()

    @property
    def plain_ok(self) -> bool:
        """Whether ``run_plain`` applies: no grad, no record/return_best, freezing, a norm the
        inlined loop computes (states with a sample dimension, float32/float64)."""
        return (self.freeze and not self.record and not self.return_best
                and not torch.is_grad_enabled() and self.norm.dims is not None
                and self.norm.norm_dtype is None)

    def _check(self, residual: Tensor, stops: Tensor | None = None) -> Tensor | None:
        """Freeze the rows of the newest column that stop: at or below tol (converged), above
        their limit or NaN (diverged). ``stops`` (A,) bool overrides the test."""
        if stops is None:
            stops = ~((residual > self._threshold) & (residual <= self._limit))  # NaN stops
        stop = stops.nonzero().squeeze(1)
        if stop.numel() == 0:
            return None
        keep = (~stops).nonzero().squeeze(1)
        stopped_rows = self.rows[stop]
        self._steps[stopped_rows] = self.k
        converged = residual[stop] <= self._threshold
        self._status[stopped_rows] = torch.where(converged, CONVERGED, DIVERGED).to(torch.int8)
        best = self._best_z[stop] if self.return_best else None
        self._frozen.append((stopped_rows, self._last[stop], best))
        self.rows = self.rows[keep]
        self.norm.select(keep)
        self._limit, self._low = self._limit[keep], self._low[: keep.shape[0]]
        self._last = self._last[keep]
        if self.return_best:
            self._best_r, self._best_z = self._best_r[keep], self._best_z[keep]
        self._close_segment()
        self._segments.append(_Segment(self.rows, self.k))
        return keep

    def _close_segment(self) -> None:
        segment = self._segments[-1]
        segment.residuals, self._columns = self._columns, []

    def _update_best(self, z: Tensor, residual: Tensor) -> None:
        if self._best_r is None:
            finite = torch.isfinite(residual)
            self._best_r = torch.where(finite, residual, torch.full_like(residual, math.inf))
            self._best_z = z
            return
        better = residual < self._best_r
        self._best_r = torch.where(better, residual, self._best_r)
        mask = better.view(-1, *([1] * (z.dim() - 1)))  # (A, 1, ..., 1)
        self._best_z = torch.where(mask, z, self._best_z)

    def finish(self) -> Solution:
        """Close the solve: rows still active end with status ``max_iter``."""
        self._close_segment()
        if self.active:
            self._steps[self.rows] = self.k
            last = self._last if self._last is not None else self.z0
            best = self._best_z if self.return_best else None
            self._frozen.append((self.rows, last, best))
        last = self._assemble(1)
        z = self._assemble(2) if self.return_best else last
        return Solution(
            z=z,
            steps=self._steps,
            status=self._status,
            residuals=self._trace(),
            states=self._states(last) if self.record else None,
            evaluations=self.evaluations,
            stop_mode=self.stop_mode,
            tol=self.tol,
            solver=self.solver,
        )

    def _assemble(self, which: int) -> Tensor:
        """(B, ...) from the frozen pieces: ``which`` 1 = last iterates, 2 = best iterates."""
        if not self._frozen:  # empty batch
            return self.z0
        if len(self._frozen) == 1:  # nobody stopped early: rows are still arange(B)
            return self._frozen[0][which]
        rows = torch.cat([piece[0] for piece in self._frozen])
        values = torch.cat([piece[which] for piece in self._frozen])
        return torch.empty_like(values).index_copy(0, rows, values)

    def _trace(self) -> Tensor:
        batch = self.z0.shape[0]
        dtype = torch.float64 if self.z0.dtype == torch.float64 else torch.float32
        if len(self._segments) == 1 and len(self._segments[0].residuals) == self.k and self.k:
            block = torch.stack(self._segments[0].residuals, 1).to(dtype)  # nobody stopped early
            return self.norm.report(torch.where(torch.isnan(block), math.inf, block))
        trace = torch.full((batch, self.k), math.nan, dtype=dtype, device=self.z0.device)
        for segment in self._segments:
            if segment.residuals:
                block = torch.stack(segment.residuals, 1).to(dtype)  # (A, L)
                block = torch.where(torch.isnan(block), math.inf, block)  # NaN f(z) -> inf
                end = segment.start + block.shape[1]
                trace[segment.rows, segment.start:end] = block
        return self.norm.report(trace)

    def _states(self, last: Tensor) -> Tensor:
        states = last.detach().unsqueeze(0).repeat(self.k, *([1] * last.dim()))  # (K, B, ...)
        for segment in self._segments:
            if segment.states:
                block = torch.stack(segment.states, 0)  # (L, A, ...)
                states[segment.start:segment.start + block.shape[0], segment.rows] = block
        if self.freeze and self.k:  # after its stop a row shows the state it is frozen at
            after = torch.arange(self.k, device=states.device)[:, None] >= self._steps
            after = after.view(*after.shape, *([1] * (last.dim() - 1)))
            states = torch.where(after, last.detach().unsqueeze(0), states)
        return states
