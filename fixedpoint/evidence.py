"""Evidence for ``classify`` beyond fixed tolerances: the trajectory's own noise floor, its
deceleration, and what the map's Jacobian says (constant or not, radius with its error, tangent
growth with its error).

Noise floor. Additive noise of size sigma on every state makes every return error at least
``nu = sigma sqrt(2 M)``, so fixed tolerances turn a noisy cycle into ``aperiodic`` and a noisy
fixed point into anything. The floor is read from the data and is only believed when the residuals
look like noise: for white noise the residual vectors ``r_k = z_{k+p} - z_k`` and ``r_{k+p}`` share
one noise term with opposite signs, so their mean cosine is -1/2, whereas a deterministic
near-return (a quasi-periodic orbit, a slow convergence) gives +1 and a true 2p-cycle seen at lag p
gives -1. Chaos also gives -1/2, but its return errors are as large as its motion; the noise path
accepts only returns below 5% of the orbit's mean step.

Deceleration. A slow contraction ``z -> 0.999 z`` moves along a line like a drift; projected on the
drift direction its positions over three equal windows close in geometrically
(``(c - b) / (b - a) = 0.999^L``), a translation's do not (ratio 1).

Tangent growth. A trajectory is chaotic when a tangent vector grows exponentially: over the last
three quarters of N steps its log growth ``G`` grows linearly in N, while for quasi-periodic and
sheared (KAM) orbits it stays O(1) (bounded, or log 4 for linear shear). The horizon follows the
map's own time scale: at least 96 / omega steps, omega the orbit's mean step over its radius of
gyration (a flow sampled with dt = 0.01 turns slowly and needs ~100x the steps of a map).
``G`` is chaotic above ``max(4 nats, 2 SE)``, contracting below the negative, neutral when
``|G| <= 4`` with an error small enough to say so, else undecidable; SE is from the spread of
block sums (``2 SE``: a two-sided 95% band).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A residual counts as noise when its lag-p cosine is -1/2 within this band.
NOISE_COSINE = (-0.8, -0.2)
NOISE_SHARE = 0.05  # noisy returns must be below this share of the orbit's mean step
GROWTH_NATS = 4.0  # late-half tangent growth that separates exponential from bounded


def asymptotic_rate(log_env: Tensor, ends: Tensor) -> Tensor:
    """(n,) lower bound (estimate - 3 SE) of the asymptotic log-growth rate per step of a growing
    envelope: ``log_env`` (W, n) at step positions ``ends`` (W,), W >= 5.

    Growth ``k^a rho^k`` (a size-(a+1) Jordan block, ``log C(k, a) ~ a log(k - (a-1)/2)``) has a
    log-growth rate ``a / k + log rho`` that falls over the window even when ``rho > 1``, so a
    falling rate alone cannot tell a transient from divergence; its limit ``log rho`` can. Fit
    ``log_env = b + a log(k - s) + c k`` for every integer a in 0..64, with the Jordan shift
    ``s = (a-1)/2`` and without it (``s = 0``: the bare ``a / k`` model, whose c is lower for a
    Jordan transient), keep each model's best a, and return the smaller ``c - 3 SE`` of the two
    (SE from the fit's residuals, W - 3 degrees of freedom). Conservative by construction: a
    contraction's c is negative under both models, a true exponential (a = 0) is fitted exactly.
    """
    w = log_env.shape[0]
    t = ends.to(log_env.dtype)  # (W,)
    alpha = torch.arange(65, dtype=log_env.dtype, device=log_env.device)  # (A,)
    t_c = t - t.mean()
    var = t_c.square().sum()
    lower = None
    for shift in ((alpha - 1).clamp_min(0) / 2, torch.zeros_like(alpha)):
        basis = torch.log((t[None] - shift[:, None]).clamp_min(0.5))  # (A, W)
        y = log_env[None] - alpha[:, None, None] * basis[:, :, None]  # (A, W, n)
        y_c = y - y.mean(1, keepdim=True)
        slope = (t_c[None, :, None] * y_c).sum(1) / var  # (A, n)
        ss = (y_c - slope[:, None] * t_c[None, :, None]).square().sum(1)  # (A, n)
        best = ss.argmin(0, keepdim=True)  # (1, n)
        c = slope.gather(0, best).squeeze(0)
        se = (ss.gather(0, best).squeeze(0) / max(1, w - 3) / var).sqrt()
        bound = c - 3 * se
        lower = bound if lower is None else torch.minimum(lower, bound)
    return lower


def distances(x: Tensor, other: Tensor) -> Tensor:
    """Per-sample ||x_k - other_k|| of (K, n, M) states, ``other`` (K, n, M) or (n, M): (K, n).

    Chunked over K into one reused buffer of ~4 MB: a whole-trajectory temporary of the same size
    as the states costs 6x more on CPU, mostly in fresh-page faults.
    """
    k, n, m = x.shape
    chunk = max(1, (1 << 20) // max(1, n * m))
    buffer = torch.empty((min(chunk, k), n, m), dtype=x.dtype, device=x.device)
    out = torch.empty((k, n), dtype=x.dtype, device=x.device)
    for start in range(0, k, chunk):
        stop = min(k, start + chunk)
        rhs = other if other.dim() == 2 else other[start:stop]
        diff = torch.sub(x[start:stop], rhs, out=buffer[: stop - start])
        out[start:stop] = torch.linalg.vector_norm(diff, dim=-1)
    return out


def q90(values: Tensor) -> Tensor:
    """90th percentile along dim 0 by nearest rank (the ceil(0.9 m)-th smallest): (m, r) -> (r,)."""
    return values.kthvalue(math.ceil(0.9 * values.shape[0]), dim=0).values


def _mean_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Mean over dim 0 of the cosine between (L, r, M) vectors a and b: (r,)."""
    dot = (a * b).sum(-1)
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return (dot / norms.clamp_min(torch.finfo(a.dtype).tiny)).mean(0)


def _noise_like(cosine: Tensor) -> Tensor:
    return (cosine > NOISE_COSINE[0]) & (cosine < NOISE_COSINE[1])


def noisy_periods(recent: Tensor, rows: Tensor, motion: Tensor, floor: Tensor, p_top: int,
                  ) -> Tensor:
    """Period (r,) of each of ``rows`` that is a cycle up to white noise, 0 where none.

    ``recent`` (W, n, M) holds the last W states, ``motion`` (n,) the mean step there.
    """
    found = torch.zeros(rows.numel(), dtype=torch.long, device=recent.device)
    if rows.numel() == 0:
        return found
    window = recent[:, rows]  # (W, r, M)
    for p in range(2, p_top + 1):
        if window.shape[0] < 3 * p:
            break
        returns = distances(window[p:], window[:-p])  # (W-p, r)
        median = returns.median(0).values
        cand = (found == 0) & (median <= NOISE_SHARE * motion[rows])
        cand &= q90(returns) <= 4 * median + floor[rows]
        idx = cand.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        vec = window[p:, idx] - window[:-p, idx]  # (W-p, c, M)
        ok = _noise_like(_mean_cosine(vec[:-p], vec[p:]))
        ok &= ~period_doubles(window[:, idx], p, floor[rows[idx]])
        found[idx[ok]] = p
    return found


def settled_in_noise(x: Tensor, scale: Tensor, floor: Tensor) -> Tensor:
    """(n,) bool: the last K/8 states are a fixed point plus white noise small against ``scale``."""
    tail = x[-max(8, x.shape[0] // 8):]  # (L, n, M)
    steps = tail[1:] - tail[:-1]
    noise = torch.linalg.vector_norm(steps, dim=-1).median(0).values  # nu = sigma sqrt(2M)
    half = tail.shape[0] // 2
    drift = torch.linalg.vector_norm(tail[half:].mean(0) - tail[:half].mean(0), dim=-1)
    quiet = drift <= 3 * noise / math.sqrt(half) + floor
    return _noise_like(_mean_cosine(steps[:-1], steps[1:])) & quiet & (noise <= NOISE_SHARE * scale)


def drift_verdict(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """(r,) bools ``slowing``, ``uniform`` for ``rows`` whose centroid moves (rule 6).

    Over the last half, split in three equal windows with centroids a, b, c, the positions
    projected on the drift direction (their least-squares trend) close in geometrically for a
    slow contraction (``(c - b) / (b - a) = q^L`` with L the window length) and keep their
    spacing for a translation (ratio 1). The ratio is only believed to its standard error: that
    of the window means, from the projected positions' deviation from a quadratic fit (white
    noise, or an orbit that is no line at all), propagated through the ratio, plus a rounding
    floor. ``slowing``: the ratio is in (0, 1) by more than 3 errors; ``uniform``: it is within
    2% of 1 (plus 3 errors: a real drift need not be exactly uniform) and 3 errors resolve 1%
    (so a 0.9999 contraction under noise is neither, and stays undetermined).
    """
    tail = x[x.shape[0] - x.shape[0] // 2:][:, rows]  # (T, r, M)
    third = tail.shape[0] // 3
    if rows.numel() == 0 or third < 2:
        none = torch.zeros(rows.numel(), dtype=torch.bool, device=x.device)
        return none, none
    tail = tail[: 3 * third]
    a, b, c = (tail[i * third:(i + 1) * third].mean(0) for i in range(3))
    tiny = torch.finfo(x.dtype).tiny
    # the least-squares trend of the positions: rotation about the drift averages out of it far
    # better than out of window centroids
    t = torch.linspace(-1, 1, tail.shape[0], dtype=x.dtype, device=x.device)
    direction = torch.einsum("t,trm->rm", t, tail - tail.mean(0))
    direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp_min(
        tiny)
    s = (tail * direction).sum(-1)  # (T, r) positions along the drift
    sa, sb, sc = (s[i * third:(i + 1) * third].mean(0) for i in range(3))
    basis = torch.stack([torch.ones_like(t), t, t * t], 1)  # (T, 3)
    coeff = torch.linalg.lstsq(basis, s).solution  # (3, r)
    # Error of a window mean from the means of the fit's residuals over 6 half windows (3 of
    # their 6 degrees of freedom are the fit's): white noise gives sigma / sqrt(L), a rotation
    # about the drift averages out of it, an orbit that is no smooth line does not.
    length = max(1, third // 2)
    blocks = (s - basis @ coeff)[: 6 * length].reshape(-1, length, s.shape[1]).mean(1)
    window_error = (blocks.square().mean(0) * 2 * length / max(1, third)).sqrt()
    rounding = 4 * torch.finfo(x.dtype).eps * s.abs().amax(0)
    first = sb - sa
    ratio = (sc - sb) / first.abs().clamp_min(tiny) * first.sign()
    error = (window_error + rounding) * torch.sqrt(
        1 + (1 + ratio).square() + ratio.square()) / first.abs().clamp_min(tiny)
    slowing = (ratio > 0) & (ratio < 1 - 3 * error)
    uniform = ((ratio - 1).abs() <= 0.02 + 3 * error) & (3 * error <= 0.01)
    return slowing, uniform


def decelerating(x: Tensor, rows: Tensor) -> Tensor:
    """(r,) bool for ``rows``: over the last half, the motion along the drift closes in."""
    return drift_verdict(x, rows)[0]


def period_doubles(window: Tensor, p: int, floor: Tensor) -> Tensor:
    """(c,) bool for (W, c, M) states whose lag-p returns look like noise: the lag-2p returns are
    clearly smaller, i.e. the lag-p returns carry a deterministic part ``d_{k+p} = -d_k`` (a 2p
    cycle whose halves are close, e.g. logistic r = 3.55 just past its 4 -> 8 doubling).

    For white noise of size sigma both lags have mean squared return 2 M sigma^2 (their ratio is
    1 to within sqrt(2 / (W M)), a few %); a deterministic part d adds |d|^2 to lag p only.
    """
    if window.shape[0] < 4 * p:
        return torch.zeros(window.shape[1], dtype=torch.bool, device=window.device)
    at_p = distances(window[p:], window[:-p]).square().mean(0)
    at_2p = distances(window[2 * p:], window[:-2 * p]).square().mean(0)
    return at_2p + floor.square() < 0.8 * at_p


def angular_speed(x: Tensor) -> Tensor:
    """(n,) the orbit's mean step over its radius of gyration in the last half: turns per step."""
    tail = x[x.shape[0] - x.shape[0] // 2:]
    step = torch.linalg.vector_norm(tail[1:] - tail[:-1], dim=-1).mean(0)
    radius = distances(tail, tail.mean(0)).square().mean(0).sqrt()
    return step / radius.clamp_min(torch.finfo(x.dtype).tiny)


def growth_verdict(growth: Tensor) -> tuple[Tensor, Tensor]:
    """From (N, B) per-step log growths: (B,) code (1 chaotic, 0 neutral, -1 contracting,
    2 undecidable) and the exponent per step over the last three quarters."""
    late = growth[growth.shape[0] // 4:]
    # +inf / NaN: the orbit from the final state overflowed (a noisy final state off the
    # attractor escapes, e.g. logistic r = 4 past x = 1): no evidence either way
    escaped = (torch.isnan(late) | (late == math.inf)).any(0)
    late = late.nan_to_num(0.0, 0.0, -1e3)  # -inf: annihilated tangent
    total = late.sum(0)
    blocks = max(2, min(16, late.shape[0] // 8))
    length = late.shape[0] // blocks
    sums = late[: blocks * length].reshape(blocks, length, -1).sum(1)  # (blocks, B)
    error = sums.std(0) * math.sqrt(blocks)
    margin = torch.clamp(2 * error, min=GROWTH_NATS)
    code = torch.full_like(total, 2, dtype=torch.long)
    code[(total.abs() <= GROWTH_NATS) & (2 * error <= GROWTH_NATS)] = 0
    code[total > margin] = 1
    code[total < -margin] = -1
    code[escaped] = 2
    return code, torch.where(escaped, torch.full_like(total, math.inf), late.mean(0))
