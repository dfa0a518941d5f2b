"""Native per-sample fixed-point solvers: damped iteration, Anderson acceleration, Broyden.

Every solver has the signature ``solver(problem: Problem, **options) -> Solution`` and follows the
loop in ``fixedpoint.problem.Problem``: f is applied to the still-active rows only, and each
solver's history (Anderson's X/F, Broyden's low-rank factors) drops the rows of frozen samples
whenever the active set shrinks, so a sample's result never depends on the others.

Sources:
* Damped (Krasnosel'skii-Mann) iteration ``z <- tau f(z) + (1 - tau) z``.
* Anderson acceleration, type II, as in Walker & Ni, "Anderson acceleration for fixed-point
  iterations" (SIAM J. Numer. Anal. 2011) and the DEQ tutorial (Kolter, Duvenaud, Johnson 2020):
  solve ``[[0, 1^T], [1, G G^T + lam I]] [nu; alpha] = [1; 0]`` and mix
  ``z = beta sum_i alpha_i f(x_i) + (1 - beta) sum_i alpha_i x_i``, computed as
  ``alpha = y / sum(y)`` with ``(G G^T + lam I) y = 1`` (the same solution, a smaller system) and
  the Gram matrix ``G G^T`` kept incrementally, one new row per step. Unlike torchdeq 0.1.0 the
  regulariser is relative (``lam`` times the mean diagonal of ``G G^T``, so it never swamps small
  residuals), the small system is solved in float32 (or float64) so bf16/fp16 states work, and a
  row whose system is singular or non-finite takes a plain damped step instead.
* Broyden's method (Broyden 1965) on ``g(z) = f(z) - z`` with an inverse-Jacobian estimate
  ``H = -I + sum_i u_i v_i^T`` kept in a bounded memory that restarts from ``-I`` when full
  ("good" = Sherman-Morrison form of the first method, as in Bai et al. DEQ 2019; "bad" = the
  second method, ``H += (dz - H dg) dg^T / (dg^T dg)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fixedpoint.problem import Problem, Solution


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Small dense algebra runs in float64 for float64 states and float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device) -> torch.autocast:
    """The solvers' own small algebra stays in float32/64 even inside a bf16 autocast region."""
    return torch.autocast(device_type=device.type, enabled=False)


def fixed_point_iter(problem: Problem, *, tau: float = 1.0) -> Solution:
    """Damped fixed-point iteration ``z <- tau f(z) + (1 - tau) z``.

    Args:
        problem: the problem and its per-sample bookkeeping.
        tau: damping in (0, 1]; 1 is plain iteration.
    """
    _check_fraction("tau", tau)
    if problem.plain_ok:
        return problem.run_plain(tau)
    z = problem.z0
    while not problem.done:
        fz = problem.evaluate(z)
        keep = problem.observe(z, fz)
        if problem.done:
            break
        if keep is not None:
            z, fz = z[keep], fz[keep]
        z = fz if tau == 1.0 else torch.lerp(z, fz, tau)
    return problem.finish()


class _AndersonHistory:
    """Per-row Anderson history with an incrementally kept Gram matrix of the residuals.

    ``x``/``f`` (A, m, D) hold the last m iterates and images (state dtype), ``g`` (A, m, D) their
    residuals ``f - x`` and ``gram`` (A, m, m) the dot products ``g_i . g_j`` in the compute dtype:
    a new entry costs one (A, m, D) x (A, D) product for its Gram row instead of rebuilding all
    m^2 products (and m subtractions) every iteration. Everything is batched over rows: no
    per-row Python and no host sync.
    """

    def __init__(self, z: Tensor, m: int) -> None:
        rows, width = z.shape[0], z[0].numel()
        self.work = _compute_dtype(z.dtype)
        self.x = z.new_empty(rows, m, width)
        self.f = torch.empty_like(self.x)
        self.g = z.new_empty(rows, m, width, dtype=self.work)
        self.gram = z.new_zeros(rows, m, m, dtype=self.work)
        self.ones = z.new_ones(rows, m, 1, dtype=self.work)
        self.eye = torch.eye(m, dtype=self.work, device=z.device)

    def push(self, slot: int, z: Tensor, fz: Tensor, gap: Tensor | None, count: int) -> None:
        """Store (z, f(z)) in ``slot``; ``gap`` is f(z) - z when already computed in work dtype."""
        rows = z.shape[0]
        self.x[:, slot] = z.reshape(rows, -1)
        self.f[:, slot] = fz.reshape(rows, -1)
        if gap is None:
            gap = fz.reshape(rows, -1).to(self.work) - z.reshape(rows, -1).to(self.work)
        self.g[:, slot] = gap.reshape(rows, -1)
        row = torch.bmm(self.g[:, :count], self.g[:, slot, :, None]).squeeze(2)  # (A, count)
        self.gram[:, slot, :count] = row
        self.gram[:, :count, slot] = row

    def select(self, keep: Tensor) -> None:
        self.x, self.f, self.g = self.x[keep], self.f[keep], self.g[keep]
        self.gram, self.ones = self.gram[keep], self.ones[: keep.shape[0]]

    def mix(self, count: int, newest: int, lam: float, beta: float) -> Tensor:
        """Next iterate (A, D) of type-II Anderson over the first ``count`` entries.

        The weights minimise ||sum_i alpha_i g_i||^2 + lam' ||alpha||^2 subject to
        sum_i alpha_i = 1: alpha = y / sum(y) with (G G^T + lam' I) y = 1, the same solution as
        the bordered system ``[[0, 1^T], [1, G G^T + lam' I]] [nu; alpha] = [1; 0]``, with
        lam' = lam x the mean diagonal of G G^T. A row whose system is singular or gives
        non-finite weights takes a plain step (weight 1 on the newest entry).
        """
        gram = self.gram[:, :count, :count]
        scale = gram.diagonal(dim1=1, dim2=2).mean(-1)  # (A,) mean ||g_i||^2
        system = gram + (lam * scale)[:, None, None] * self.eye[:count, :count]
        y, info = torch.linalg.solve_ex(system, self.ones[:, :count])
        y = y.squeeze(2)  # (A, count)
        total = y.sum(1, keepdim=True)
        ok = (info == 0)[:, None] & torch.isfinite(total)
        alpha = torch.where(ok, y / total, self.eye[newest, :count])[:, None]  # (A, 1, count)
        f_hist = self.f[:, :count]
        mixed = torch.bmm(alpha, f_hist if f_hist.dtype == self.work else f_hist.to(self.work))
        if beta != 1.0:
            x_hist = self.x[:, :count].to(self.work)
            mixed = beta * mixed + (1.0 - beta) * torch.bmm(alpha, x_hist)
        return mixed.squeeze(1)


def anderson(
    problem: Problem, *, m: int = 5, beta: float = 1.0, lam: float = 1e-4
) -> Solution:
    """Type-II Anderson acceleration with memory ``m``, mixing ``beta``, relative ridge ``lam``.

    Args:
        problem: the problem and its per-sample bookkeeping.
        m: number of past (x, f(x)) pairs mixed (>= 1; 1 is damped iteration).
        beta: mixing in (0, 1]; 1 mixes images f(x_i) only.
        lam: ridge regulariser relative to the mean diagonal of G G^T (>= 0).
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (Anderson memory) must be an int >= 1, got {m!r}")
    _check_fraction("beta", beta)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"lam must be a number >= 0, got {lam!r}")
    z = problem.z0
    shape, dtype = z.shape[1:], z.dtype
    history = _AndersonHistory(z, m)
    reuse_gap = _compute_dtype(dtype) == dtype  # the bookkeeping's f(z) - z is exact enough
    k = 0
    while not problem.done:
        fz = problem.evaluate(z)
        keep = problem.observe(z, fz)
        if problem.done:
            break
        slot, count = k % m, min(k + 1, m)
        gap = problem.gap if reuse_gap else None
        if keep is not None:
            z, fz = z[keep], fz[keep]
            gap = None if gap is None else gap[keep]
            history.select(keep)
        k += 1
        with _no_autocast(z.device):
            history.push(slot, z, fz, gap, count)
            if count == 1:
                z = fz if beta == 1.0 else torch.lerp(z, fz, beta)
                continue
            z = history.mix(count, slot, lam, beta)
        z = z.reshape(-1, *shape).to(dtype)  # (A, ...)
    return problem.finish()


def _apply(u: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """``H x`` with ``H = -I + sum_i u_i v_i^T``; u, v (A, n, D), x (A, D)."""
    if u.shape[1] == 0:
        return -x
    coeff = torch.bmm(v, x[:, :, None])  # (A, n, 1)
    return torch.bmm(coeff.transpose(1, 2), u).squeeze(1) - x  # (A, D)


def _apply_transposed(u: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """``H^T x`` with ``H = -I + sum_i u_i v_i^T``."""
    return _apply(v, u, x)


def _broyden_factors(
    u: Tensor, v: Tensor, dz: Tensor, dg: Tensor, variant: str
) -> tuple[Tensor, Tensor]:
    """Rank-one update (u_new, v_new) of the inverse Jacobian; zero for rows with no safe update."""
    h_dg = _apply(u, v, dg)  # (A, D)
    v_new = _apply_transposed(u, v, dz) if variant == "good" else dg
    denom = (v_new * dg).sum(-1, keepdim=True)  # (A, 1)
    scale = torch.linalg.vector_norm(v_new, dim=-1, keepdim=True)
    scale = scale * torch.linalg.vector_norm(dg, dim=-1, keepdim=True)
    ok = (denom.abs() > 1e-12 * scale) & torch.isfinite(denom)
    u_new = (dz - h_dg) / torch.where(ok, denom, torch.ones_like(denom))
    zero = torch.zeros_like(u_new)
    return torch.where(ok, u_new, zero), torch.where(ok, v_new, zero)


def broyden(problem: Problem, *, memory: int = 20, variant: str = "good") -> Solution:
    """Limited-memory Broyden root finding on ``g(z) = f(z) - z``.

    Args:
        problem: the problem and its per-sample bookkeeping.
        memory: rank-one updates kept (>= 1); when full, the estimate restarts from ``-I``
            (memory is bounded independently of ``max_iter``).
        variant: ``"good"`` (first method) or ``"bad"`` (second method).
    """
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory must be an int >= 1, got {memory!r}")
    if variant not in ("good", "bad"):
        raise ValueError(f"variant must be 'good' or 'bad', got {variant!r}")
    z0 = problem.z0
    shape, dtype = z0.shape[1:], z0.dtype
    work = _compute_dtype(dtype)
    z = z0.reshape(z0.shape[0], -1).to(work)  # (A, D)
    u = z.new_zeros(z.shape[0], memory, z.shape[1])  # (A, L, D)
    v = torch.zeros_like(u)
    count, previous = 0, None
    while not problem.done:
        state = z.reshape(-1, *shape).to(dtype)
        fz = problem.evaluate(state)
        keep = problem.observe(state, fz)
        if problem.done:
            break
        gap = fz.reshape(z.shape[0], -1).to(work) - z  # (A, D)
        if keep is not None:
            z, gap, u, v = z[keep], gap[keep], u[keep], v[keep]
            previous = None if previous is None else (previous[0][keep], previous[1][keep])
        with _no_autocast(z.device):
            if previous is not None:
                if count == memory:
                    count = 0  # restart from H = -I
                du, dv = _broyden_factors(
                    u[:, :count], v[:, :count], z - previous[0], gap - previous[1], variant
                )
                u[:, count], v[:, count] = du, dv
                count += 1
            previous = (z, gap)
            z = z - _apply(u[:, :count], v[:, :count], gap)  # z - H g
    return problem.finish()
