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


def decelerating(x: Tensor, rows: Tensor) -> Tensor:
    """(r,) bool for ``rows``: over the last half, the motion along the drift closes in."""
    tail = x[x.shape[0] - x.shape[0] // 2:][:, rows]  # (T, r, M)
    third = tail.shape[0] // 3
    a, b, c = (tail[i * third:(i + 1) * third].mean(0) for i in range(3))
    direction = c - a
    direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp_min(
        torch.finfo(x.dtype).tiny)
    sa, sb, sc = ((w * direction).sum(-1) for w in (a, b, c))
    ratio = (sc - sb) / (sb - sa).clamp_min(torch.finfo(x.dtype).tiny)
    return (ratio > 0) & (ratio < 0.98)


def angular_speed(x: Tensor) -> Tensor:
    """(n,) the orbit's mean step over its radius of gyration in the last half: turns per step."""
    tail = x[x.shape[0] - x.shape[0] // 2:]
    step = torch.linalg.vector_norm(tail[1:] - tail[:-1], dim=-1).mean(0)
    radius = distances(tail, tail.mean(0)).square().mean(0).sqrt()
    return step / radius.clamp_min(torch.finfo(x.dtype).tiny)


def growth_verdict(growth: Tensor) -> tuple[Tensor, Tensor]:
    """From (N, B) per-step log growths: (B,) code (1 chaotic, 0 neutral, -1 contracting,
    2 undecidable) and the exponent per step over the last three quarters."""
    late = growth[growth.shape[0] // 4:].nan_to_num(0.0, 0.0, -1e3)  # -inf: annihilated tangent
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
    return code, late.mean(0)
