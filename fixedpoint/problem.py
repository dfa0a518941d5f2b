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

Cost per iteration: the residual norm, one reduction (the smallest residual of the active rows:
a row at or below ``tol``, or a NaN anywhere, shows there) and one host sync; the rows are then
compacted in the very iteration they stop, so stopped rows are never evaluated again. The
blow-up limit is checked on the last 8 iterations at once (their iterates are kept by reference,
at most ``WINDOW_BYTES``; every iteration with ``return_best``), and a row that crossed it is
frozen at the exact iterate where it did: steps, status, z, trace and states are the same as
with a check every iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fixedpoint.maps import RowMap, as_row_map

STATUS_NAMES = ("converged", "max_iter", "diverged")
LIMIT_EVERY = 8  # iterations between blow-up checks (the tolerance is checked every iteration)
WINDOW_BYTES = 64 * 2**20  # most memory the iterates kept for those checks may hold
CONVERGED, MAX_ITER, DIVERGED = 0, 1, 2


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
        evaluations: total rows f was evaluated on during the forward solve (sum of ``steps``
            for native solvers, plus at most 7 evaluations past the crossing for each sample
            frozen for exceeding ``diverge_factor``, which is checked every 8 iterations;
            backward re-attachment evaluations are not counted).
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
        self._limit: Tensor | None = None
        self._columns: list[Tensor] = []  # residuals of the current segment, one per iteration
        self._window: list[Tensor] = []  # iterates since the last blow-up check (references)
        state_bytes = z0.numel() * z0.element_size()
        self._every = 1 if return_best or state_bytes * LIMIT_EVERY > WINDOW_BYTES \
            else LIMIT_EVERY
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

        Every iteration costs one reduction (the smallest residual: a row at or below ``tol``, or
        a NaN, shows there) and one host sync. The blow-up limit (``diverge_factor``) is checked
        on the last ``_every`` iterations at once, with their iterates kept by reference, so a
        row that crossed it is still frozen exactly at the iterate where it did (its ``steps``,
        status and ``z`` are those of that iteration; only its few evaluations past it are
        spent). ``gap`` holds ``fz - z`` for solvers that reuse it.

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
            self._limit = residual * self.diverge_factor
            self._window.append(z)
            stops = ~((residual > self._threshold) & torch.isfinite(residual))
            return self._check(stops[:, None] if bool(stops.any()) else None)
        self._window.append(z)
        if float(residual.min()) > self._threshold:  # no row at tol; NaN fails this test
            if len(self._window) < self._every and self.k < self.max_iter:
                return None
            low_only = True
        else:
            low_only = False
        block = torch.stack(self._columns[-len(self._window):], 1)  # (A, W)
        below = block <= self._limit[:, None]  # False: above the limit, or NaN
        if low_only and bool(below.all()):
            return self._check(None)
        stops = ~below
        if not low_only:
            stops |= block <= self._threshold
        return self._check(stops)

    def _check(self, stops: Tensor | None) -> Tensor | None:
        """Freeze each row at the first window column where ``stops`` (A, W) is set."""
        if stops is None:
            self._window = []
            return None
        hit = stops.any(1)
        if not bool(hit.any()):
            self._window = []
            return None
        stop = hit.nonzero().squeeze(1)
        keep = (~hit).nonzero().squeeze(1)
        stopped_rows = self.rows[stop]
        width = len(self._window)
        if width == 1:  # the common case: rows stop at the newest iterate
            residual = self._columns[-1][stop]
            self._steps[stopped_rows] = self.k
            last = self._window[-1][stop]
        else:
            at = stops.to(torch.uint8).argmax(1)[stop]  # first stopping column of each row
            residual = torch.stack(self._columns[-width:], 1)[stop, at]
            self._steps[stopped_rows] = self.k - width + 1 + at
            if bool((at == width - 1).all()):
                last = self._window[-1][stop]
            else:  # some row stopped before the newest iterate: take it from the window
                last = torch.stack(self._window)[at, stop]
        converged = residual <= self._threshold
        self._status[stopped_rows] = torch.where(converged, CONVERGED, DIVERGED).to(torch.int8)
        best = self._best_z[stop] if self.return_best else None
        self._frozen.append((stopped_rows, last, best))
        self._window = []
        self.rows = self.rows[keep]
        self.norm.select(keep)
        self._limit = self._limit[keep]
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
        trace = torch.full((batch, self.k), math.nan, dtype=dtype, device=self.z0.device)
        for segment in self._segments:
            if segment.residuals:
                block = torch.stack(segment.residuals, 1).to(dtype)  # (A, L)
                block = torch.where(torch.isnan(block), math.inf, block)  # NaN f(z) -> inf
                end = segment.start + block.shape[1]
                trace[segment.rows, segment.start:end] = block
        if self.freeze and self.k:  # a row frozen inside a window was evaluated past its stop
            trace[torch.arange(self.k, device=trace.device) >= self._steps[:, None]] = math.nan
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
