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
  ``z = beta sum_i alpha_i f(x_i) + (1 - beta) sum_i alpha_i x_i``. Unlike torchdeq 0.1.0 the
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


def _anderson_weights(x_hist: Tensor, f_hist: Tensor, lam: float, newest: int) -> Tensor:
    """Mixing weights alpha (A, n) of type-II Anderson from histories (A, n, D).

    Rows whose bordered system is singular or gives non-finite weights fall back to weight 1
    on the newest entry (a plain step).
    """
    dtype = _compute_dtype(x_hist.dtype)
    gaps = f_hist.to(dtype) - x_hist.to(dtype)  # (A, n, D) residuals g_i = f(x_i) - x_i
    gram = torch.bmm(gaps, gaps.transpose(1, 2))  # (A, n, n)
    count = gram.shape[-1]
    scale = gram.diagonal(dim1=1, dim2=2).mean(-1)  # (A,) mean ||g_i||^2
    eye = torch.eye(count, dtype=dtype, device=gram.device)
    system = gram.new_zeros(gram.shape[0], count + 1, count + 1)  # (A, n+1, n+1)
    system[:, 0, 1:] = 1.0
    system[:, 1:, 0] = 1.0
    system[:, 1:, 1:] = gram + (lam * scale)[:, None, None] * eye
    rhs = gram.new_zeros(gram.shape[0], count + 1, 1)
    rhs[:, 0] = 1.0
    solution, info = torch.linalg.solve_ex(system, rhs)
    alpha = solution[:, 1:, 0]  # (A, n)
    bad = (info != 0) | ~torch.isfinite(alpha).all(-1)
    plain = torch.zeros_like(alpha)
    plain[:, newest] = 1.0
    return torch.where(bad[:, None], plain, alpha)


def _anderson_mix(x_hist: Tensor, f_hist: Tensor, lam: float, newest: int, beta: float) -> Tensor:
    """Next iterate (A, D), mixed in float32/64 (bf16 weights would cancel badly)."""
    alpha = _anderson_weights(x_hist, f_hist, lam, newest)[:, None]  # (A, 1, n)
    mixed = torch.bmm(alpha, f_hist.to(alpha.dtype))  # (A, 1, D)
    if beta != 1.0:
        mixed = beta * mixed + (1.0 - beta) * torch.bmm(alpha, x_hist.to(alpha.dtype))
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
    shape = z.shape[1:]
    x_hist = z.new_empty(z.shape[0], m, shape.numel())  # (A, m, D)
    f_hist = torch.empty_like(x_hist)
    k = 0
    while not problem.done:
        fz = problem.evaluate(z)
        keep = problem.observe(z, fz)
        if problem.done:
            break
        slot = k % m
        x_hist[:, slot] = z.reshape(z.shape[0], -1)
        f_hist[:, slot] = fz.reshape(z.shape[0], -1)
        if keep is not None:
            x_hist, f_hist, z, fz = x_hist[keep], f_hist[keep], z[keep], fz[keep]
        k += 1
        count = min(k, m)
        if count == 1:
            z = fz if beta == 1.0 else torch.lerp(z, fz, beta)
            continue
        with _no_autocast(z.device):
            z = _anderson_mix(x_hist[:, :count], f_hist[:, :count], lam, slot, beta)
        z = z.reshape(-1, *shape).to(problem.z0.dtype)  # (A, ...)
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
