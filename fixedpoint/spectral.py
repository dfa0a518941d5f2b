"""Local stability of a map z -> f(z): Jacobian spectral radius and finite-time Lyapunov exponent.

Both quantities are per sample: ``f`` maps a (B, ...) batch to the same shape with independent rows,
so its Jacobian is block diagonal and one Jacobian-vector product serves the whole batch.

Sources:
- Spectral radius from the Ritz values of a batched Arnoldi process on Jacobian-vector products
  (``fixedpoint.krylov``): power iteration's k-th-root growth is wrong on non-normal and nilpotent
  Jacobians at any affordable k (1.31 for a Jordan block of eigenvalue 0.9, 0.99 for a nilpotent
  shift); Ritz values are exact once the Krylov space is invariant and right for complex pairs
  (where the Rayleigh quotient of torchdeq's ``sradius`` fails, REFERENCE.md section 3-4).
- On a period-p cycle the meaningful quantity is the spectral radius of the p-step product
  ``J(z_{p-1}) ... J(z_0)`` (Floquet multiplier of the cycle); ``period=p`` composes ``f`` p times
  and returns its p-th root, so the result is comparable with the one-step radius (< 1 stable).
- Finite-time largest Lyapunov exponent after Benettin, Galgani, Giorgilli & Strelcyn (1980,
  Meccanica 15): propagate a tangent vector along the trajectory, renormalise every step, average
  the log growth per step.
- Forward-mode AD is not implemented through the fused CPU scaled-dot-product attention kernels
  (pytorch#128971). ``method="vjp"`` runs the same iterations on ``J^T`` with reverse mode, which
  works through any differentiable op; the spectral radius of ``J^T`` equals that of ``J``, and the
  growth of a covector propagated backwards along a trajectory has the same exponent (the singular
  values of a product and of its transpose agree). ``method="jvp"`` falls back to it automatically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fixedpoint.krylov import arnoldi, ritz_radius
from fixedpoint.maps import RowMap

Map = Callable[..., Tensor]
METHODS = ("jvp", "vjp")


def whole_batch(
    f: Map, batch: int | None = None, inputs: Any = None
) -> Callable[[Tensor], Tensor]:
    """``f`` as a whole-batch map: ``f(z, *inputs)``, ``f(z, rows=arange(B))`` or ``f(z)``."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    call = None if batch is None else RowMap(f, batch, inputs)

    def checked(z: Tensor) -> Tensor:
        nonlocal call
        if call is None:
            call = RowMap(f, z.shape[0], inputs)
        out = call(z)
        if not isinstance(out, Tensor):
            raise TypeError(f"f must return a Tensor, got {type(out).__name__}")
        if out.shape != z.shape or out.device != z.device:
            raise ValueError(f"f must return its input's shape and device: expected "
                             f"{tuple(z.shape)} on {z.device}, received {tuple(out.shape)} on "
                             f"{out.device}")
        return out

    return checked


def _sample_norm(x: Tensor) -> Tensor:
    """Per-sample Euclidean norm in float32 or better: (B, ...) -> (B,)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1).to(dtype), dim=1)


def _unit(x: Tensor, norm: Tensor, fallback: Tensor) -> Tensor:
    """``x / norm`` per sample; rows with zero or non-finite norm keep ``fallback``."""
    good = (norm > 0) & torch.isfinite(norm)
    shape = (-1,) + (1,) * (x.dim() - 1)
    scaled = x / norm.clamp_min(torch.finfo(norm.dtype).tiny).to(x.dtype).view(shape)
    return torch.where(good.view(shape), scaled, fallback)


def _random_unit(z: Tensor, generator: torch.Generator | None) -> Tensor:
    """A random direction per sample, shaped and typed like ``z`` (seeded, device-agnostic)."""
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(z.shape, generator=generator, device=generator.device, dtype=torch.float32)
    v = v.to(device=z.device, dtype=z.dtype)
    return _unit(v, _sample_norm(v), v)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _compose(f: Callable[[Tensor], Tensor], period: int) -> Callable[[Tensor], Tensor]:
    if period == 1:
        return f

    def composed(z: Tensor) -> Tensor:
        for _ in range(period):
            z = f(z)
        return z

    return composed


class SpectralRadius(NamedTuple):
    """``spectral_radius(..., with_error=True)``: the estimate, its error bound, and whether it is
    trustworthy (``error <= rtol * max(rho, rtol)``)."""

    rho: Tensor
    error: Tensor
    converged: Tensor


def _operator(
    g: Callable[[Tensor], Tensor], z: Tensor, method: str
) -> Callable[[Tensor], Tensor]:
    """Flat float64 (B, N) -> (B, N): ``J v`` (jvp) or ``J^T v`` (vjp) of g at z, per sample."""
    shape, dtype = z.shape, z.dtype

    def as_state(v: Tensor) -> Tensor:
        return v.to(dtype).reshape(shape)

    if method == "jvp":
        def jvp(v: Tensor) -> Tensor:
            with torch.no_grad():
                return torch.func.jvp(g, (z,), (as_state(v),))[1].reshape(shape[0], -1).double()

        return jvp
    with torch.enable_grad():
        z_in = z.detach().requires_grad_(True)
        out = g(z_in)

    def vjp(v: Tensor) -> Tensor:
        (jtv,) = torch.autograd.grad(out, z_in, as_state(v), retain_graph=True)
        return jtv.reshape(shape[0], -1).double()

    return vjp


def _ritz(g: Callable[[Tensor], Tensor], z: Tensor, v: Tensor, iters: int, method: str,
          ) -> tuple[Tensor, Tensor]:
    steps = min(iters, z[0].numel())
    eps = float(torch.finfo(z.dtype).eps)
    apply = _operator(g, z, method)
    flat = v.reshape(v.shape[0], -1).double()
    image = None
    if method == "jvp":
        try:
            image = apply(flat)  # forward AD missing for some op (fused CPU SDPA): fall back to vjp
        except (RuntimeError, NotImplementedError):
            apply = _operator(g, z, "vjp")
    hess, beta, dims, lost = arnoldi(apply, flat, steps, eps)
    # H is the restriction of J + E, E the rounding of the map's own Jacobian products: measured,
    # not assumed (an fp32 map's products err by ~sqrt(N) eps ||J||, not eps ||H||)
    noise = _evaluation_noise(apply, flat, image) * dims.clamp_min(1).double().sqrt()
    rho, error = ritz_radius(hess, beta, eps, dims, lost)
    return rho, torch.maximum(error, _sensitivity(hess, beta, eps, dims, lost + noise, rho, noise))


def _evaluation_noise(apply: Callable[[Tensor], Tensor], v: Tensor, image: Tensor | None,
                      ) -> Tensor:
    """(B,) rounding of one Jacobian product with a unit vector: J is linear, so
    ``||J a + J b - J(a + b)||`` for unit a, b is pure evaluation error (zero in exact
    arithmetic; about sqrt(3) times a single product's). Three extra products."""
    gen = torch.Generator(device="cpu").manual_seed(2)
    u = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.device)
    u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(1e-300)
    a = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300)
    ja = apply(a) if image is None else image / torch.linalg.vector_norm(
        v, dim=1, keepdim=True).clamp_min(1e-300)
    noise = torch.linalg.vector_norm(ja + apply(u) - apply(a + u), dim=1)
    return noise.nan_to_num(0.0, 0.0, 0.0)


def _sensitivity(hess: Tensor, beta: Tensor, eps: float, dims: Tensor, lost: Tensor,
                 rho: Tensor, noise: Tensor, draws: int = 3) -> Tensor:
    """(B,) twice the largest move of the radius estimate when H is perturbed by random dense
    matrices of Frobenius norm ``noise`` (the measured rounding of the Krylov matrix).

    The first-order bound ``kappa (delta + r)`` of ``ritz_radius`` fails when the perturbation is
    not small against the eigenvalue's distance to its neighbours (a strongly non-normal fp32 map:
    0.27 off under a bound of 0.002); re-estimating under perturbations of the size the data
    carry shows the real, higher-order sensitivity."""
    m = hess.shape[-1]
    gen = torch.Generator(device="cpu").manual_seed(3)
    lead = (torch.arange(m, device=hess.device)[None] < dims[:, None]).to(hess.dtype)  # (B, m)
    mask = lead[:, :, None] * lead[:, None, :]
    move = torch.zeros_like(rho)
    for _ in range(draws):
        e = torch.randn(hess.shape, generator=gen, dtype=torch.float64).to(hess.device) * mask
        e = e * (noise / torch.linalg.matrix_norm(e).clamp_min(1e-300))[:, None, None]
        other, _ = ritz_radius(hess + e, beta, eps, dims, lost)
        move = torch.maximum(move, (other - rho).abs().nan_to_num(math.inf, math.inf, math.inf))
    return 2 * move


def spectral_radius(
    f: Map,
    z: Tensor,
    iters: int = 64,
    *,
    inputs: Any = None,
    method: str = "jvp",
    period: int = 1,
    generator: torch.Generator | None = None,
    with_error: bool = False,
    rtol: float = 1e-2,
) -> Tensor | SpectralRadius:
    """Per-sample spectral radius of the Jacobian of ``f`` at ``z`` from Arnoldi's Ritz values.

    Right on non-normal, defective and nilpotent Jacobians, on complex pairs and rotations
    (``fixedpoint.krylov``); exact once the Krylov space is invariant (a state dimension <= iters,
    a Jacobian of rank < iters, or a nilpotency index < iters). No dense Jacobian is formed.

    Args:
        f: batched map (B, ...) -> (B, ...) with independent rows: ``f(z, *inputs)``, a plain
            ``f(z)``, or the deprecated ``f(z, rows)`` (given ``arange(B)``).
        z: (B, ...) point at which the Jacobian is taken. Not modified; no gradient reaches it.
        iters: Krylov dimension (Jacobian products), capped at the state size.
        inputs: per-sample inputs of f, as for ``solve``.
        method: ``"jvp"`` (forward mode on J; falls back to ``"vjp"`` when forward AD raises) or
            ``"vjp"`` (reverse mode on J^T; same spectrum).
        period: compose ``f`` this many times and return the ``period``-th root of the radius of
            the composed map, i.e. the per-step Floquet multiplier of a period-``period`` cycle
            through ``z``. With ``period=1`` the plain one-step radius.
        generator: seeds the random start vector (default: a CPU generator seeded 0).
        with_error: return ``SpectralRadius(rho, error, converged)`` instead of rho.
        rtol: relative error under which ``converged`` is True.

    Returns:
        (B,) rho per sample (float32, or float64 for float64 ``z``), or a ``SpectralRadius``.

    Example:
        >>> a = 0.9 * torch.tensor([[0.309, -0.951], [0.951, 0.309]])  # 0.9 x rotation 2pi/5
        >>> spectral_radius(lambda z: z @ a.T, torch.zeros(3, 2))  # 0.9 for each of the 3 rows
    """
    _check_method(method)
    if not isinstance(iters, int) or iters < 2:
        raise ValueError(f"iters must be an int >= 2, got {iters!r}")
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be an int >= 1, got {period!r}")
    if not isinstance(z, Tensor) or z.dim() < 1 or z.shape[0] == 0:
        raise ValueError(f"z must be a (B, ...) tensor with B >= 1, got {getattr(z, 'shape', z)}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got dtype {z.dtype}")
    g = _compose(whole_batch(f, z.shape[0], inputs), period)
    z = z.detach()
    rho, error = _ritz(g, z, _random_unit(z, generator), iters, method)
    out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    # the p-th root of the p-step radius; its error by the derivative of x^(1/p)
    root = rho.clamp_min(0) ** (1.0 / period)
    error = error * root / (period * rho.clamp_min(1e-300)) if period > 1 else error
    root, error = root.to(out_dtype), error.to(out_dtype)
    if not with_error:
        return root
    return SpectralRadius(root, error, error <= rtol * root.clamp_min(rtol))


def _renormalised_growth(
    product: Callable[[int, Tensor], Tensor], v: Tensor, count: int, warmup: int
) -> Tensor:
    """Benettin's loop: ``v <- product(i, v)``, renormalised each step, for ``count`` steps.

    Returns the (count - warmup, B) log growths after the first ``warmup`` (which only align v
    with the most expanding direction), in the order the products were taken.
    """
    growth = []
    for i in range(count):
        jv = product(i, v)
        norm = _sample_norm(jv)
        if i >= warmup:
            growth.append(norm.log())
        v = _unit(jv, norm, v)
    return torch.stack(growth)


def _benettin_jvp(
    g: Callable[[Tensor], Tensor], z: Tensor, v: Tensor, steps: int, warmup: int
) -> Tensor:
    state = [z]

    def forward(_: int, u: Tensor) -> Tensor:  # J(z_i) u, advancing the state with it
        state[0], ju = torch.func.jvp(g, (state[0],), (u,))
        return ju

    return _renormalised_growth(forward, v, warmup + steps, warmup)  # (steps, B)


def _benettin_vjp(
    g: Callable[[Tensor], Tensor], z: Tensor, v: Tensor, steps: int, warmup: int
) -> Tensor:
    # Forward: warm the state up, then record the states whose Jacobians are multiplied.
    with torch.no_grad():
        for _ in range(warmup):
            z = g(z)
        states = []
        for _ in range(warmup + steps):
            states.append(z)
            z = g(z)
    # Backward: propagate a covector from the last state to the first; its first ``warmup``
    # growths align it with the dominant singular direction and are not counted.

    def backward(i: int, u: Tensor) -> Tensor:  # J(z_{n-1-i})^T u
        z_in = states[-1 - i].detach().requires_grad_(True)
        return torch.autograd.grad(g(z_in), z_in, u)[0]

    with torch.enable_grad():
        growth = _renormalised_growth(backward, v, warmup + steps, warmup)
    return growth.flip(0)  # (steps, B), in time order


def tangent_growth(
    f: Map,
    z0: Tensor,
    steps: int,
    *,
    warmup: int = 0,
    method: str = "jvp",
    inputs: Any = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(steps, B) log growth of a renormalised tangent vector per step (Benettin's summands)."""
    g = whole_batch(f, z0.shape[0], inputs)
    z0 = z0.detach()
    v = _random_unit(z0, generator)
    if method == "jvp":
        try:
            with torch.no_grad():
                return _benettin_jvp(g, z0, v, steps, warmup)
        except (RuntimeError, NotImplementedError):
            pass
    return _benettin_vjp(g, z0, v, steps, warmup).detach()


def lyapunov_exponent(
    f: Map,
    z0: Tensor,
    steps: int,
    *,
    warmup: int = 0,
    method: str = "jvp",
    inputs: Any = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Finite-time largest Lyapunov exponent along the trajectory of ``f`` from ``z0`` (Benettin).

    Args:
        f: batched map (B, ...) -> (B, ...) with independent rows.
        z0: (B, ...) initial states.
        steps: steps whose log growth is averaged.
        warmup: steps run first and not counted; they move the state onto its attractor and align
            the tangent vector with the most expanding direction (the standard transient discard).
        method: ``"jvp"`` (tangent vector forward; falls back to ``"vjp"`` if forward AD raises) or
            ``"vjp"`` (covector propagated backwards over the recorded states; same exponent).
        inputs: per-sample inputs of f, as for ``solve``.
        generator: seeds the random initial tangent vector.

    Returns:
        (B,) mean log growth per step (nats/step): > 0 chaotic, ~0 neutral (rotations,
        quasi-periodic orbits), < 0 contracting; ``-inf`` where the Jacobian annihilates the
        tangent vector.

    Example:
        >>> z0 = torch.rand(8, 1) * 0.8 + 0.1
        >>> logistic = lambda z: 4 * z * (1 - z)
        >>> lyapunov_exponent(logistic, z0.double(), 2000, warmup=10).mean()  # ~ln 2 = 0.69
    """
    _check_method(method)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(z0, Tensor) or z0.dim() < 1 or z0.shape[0] == 0:
        got = getattr(z0, "shape", z0)
        raise ValueError(f"z0 must be a (B, ...) tensor with B >= 1, got {got}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}")
    growth = tangent_growth(f, z0, steps, warmup=warmup, method=method, inputs=inputs,
                            generator=generator)
    return growth.mean(0)
