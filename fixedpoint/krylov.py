"""Batched Arnoldi on a Jacobian operator and a spectral radius from its Ritz values.

Why not power iteration: on a non-normal or nilpotent Jacobian ``||J^k v||`` grows like a
polynomial in k times rho^k, so its k-th root converges like (polynomial)^(1/k): 1.31 for a Jordan
block of eigenvalue 0.9 after 30 steps, 0.99 for a nilpotent shift whose radius is 0. Arnoldi
(Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed., ch. 6) builds an orthonormal
basis Q of the Krylov space span{v, Jv, ..., J^{m-1} v} and the Hessenberg matrix H = Q^T J Q; its
eigenvalues (Ritz values) are exact once the space is invariant (breakdown, ``h_{j+1,j} = 0``),
which happens after d + 1 steps when J has rank d (a low-dimensional system embedded in a large
space) or after the nilpotency index (the parallel loop's step).

One more trap: a Jordan-like block of size s is so ill-conditioned that rounding errors of size
delta in H scatter its s Ritz values on a ring of radius ~delta^(1/s) around the true eigenvalue
(0.1 for s = 16 in float64). The ring's centroid, however, is well conditioned (the mean of a
cluster of eigenvalues is, Kato 1966, *Perturbation Theory*, II §5). So Ritz values whose
first-order error bounds ``kappa_i (delta + r_i)`` (kappa_i the eigenvalue condition number from
left and right eigenvectors of H, r_i the Ritz residual ``|h_{m+1,m} s_{m,i}|``) overlap are
merged into clusters and each cluster is replaced by its mean; the radius is the largest modulus
of a cluster mean. Well-conditioned eigenvalues (normal maps, rotations, complex pairs) have
small bounds and are never merged, so |a +- bi| stays right.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Apply = Callable[[Tensor], Tensor]


def arnoldi(apply: Apply, v0: Tensor, steps: int, eps: float,
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``steps`` Arnoldi steps per sample from v0 (B, N), float64 basis, twice-orthogonalised.

    Args:
        apply: (B, N) float64 -> (B, N) float64, the per-sample operator.
        v0: (B, N) start vectors.
        steps: Krylov dimension m.
        eps: relative size of the operator's rounding: below ``8 sqrt(N) eps`` of its input's
            image, a new direction is rounding noise and the space is taken as invariant.

    Returns:
        H (B, m, m) Hessenberg matrices (zero after a sample's breakdown), beta (B,) the last
        subdiagonal ``h_{m+1,m}`` (0 for samples whose space became invariant) and dims (B,) long,
        each sample's Krylov dimension (its leading dims x dims block of H is its Arnoldi matrix)
        and lost (B,) the subdiagonal dropped at a breakdown (below the threshold; 0 if none):
        the leading block is the exact restriction of an operator within ``lost`` of J.
    """
    batch, n = v0.shape
    basis = v0.new_zeros(batch, steps + 1, n)
    hess = v0.new_zeros(batch, steps + 1, steps)
    basis[:, 0] = v0 / torch.linalg.vector_norm(v0, dim=1, keepdim=True).clamp_min(1e-300)
    alive = torch.ones(batch, dtype=torch.bool, device=v0.device)
    threshold = 8 * math.sqrt(n) * eps
    dims = torch.zeros(batch, dtype=torch.long, device=v0.device)
    lost = v0.new_zeros(batch)
    for j in range(steps):
        dims += alive
        w = apply(basis[:, j])  # (B, N)
        size = torch.linalg.vector_norm(w, dim=1)
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
            coeff = torch.bmm(basis[:, : j + 1], w[:, :, None]).squeeze(2)  # (B, j+1)
            w = w - torch.bmm(coeff[:, None, :], basis[:, : j + 1]).squeeze(1)
            hess[:, : j + 1, j] += coeff
        beta = torch.linalg.vector_norm(w, dim=1)
        scale = torch.maximum(size, torch.linalg.vector_norm(hess[:, : j + 1, j], dim=1))
        was = alive
        alive = was & (beta > threshold * scale) & torch.isfinite(beta)
        lost = torch.where(was & ~alive, beta.nan_to_num(0.0, 0.0, 0.0), lost)
        beta = torch.where(alive, beta, torch.zeros_like(beta))
        hess[:, j + 1, j] = beta
        basis[:, j + 1] = torch.where(alive[:, None], w / beta.clamp_min(1e-300)[:, None], 0.0)
        if not bool(alive.any()):
            hess, steps = hess[:, : j + 2, : j + 1], j + 1
            break
    return hess[:, :steps, :steps], hess[:, steps, steps - 1], dims, lost


def _condition(vectors: Tensor) -> Tensor:
    """Eigenvalue condition numbers |x_i| |y_i| / |y_i^* x_i| from right eigenvectors (B, m, m)."""
    inverse, info = torch.linalg.inv_ex(vectors)
    left = torch.linalg.vector_norm(inverse, dim=2)  # rows of V^-1: left eigenvectors, scaled
    right = torch.linalg.vector_norm(vectors, dim=1)
    kappa = (left * right).real
    bad = (info != 0)[:, None] | ~torch.isfinite(kappa)
    return torch.where(bad, torch.full_like(kappa, math.inf), kappa)


def _components(linked: Tensor) -> Tensor:
    """Transitive closure of a symmetric (B, m, m) bool relation (connected components)."""
    reach = linked.to(torch.float32)
    for _ in range(max(1, math.ceil(math.log2(max(2, linked.shape[-1]))))):
        reach = (torch.bmm(reach, reach) > 0).to(torch.float32)
    return reach > 0


def _single_eigenvalue(hess: Tensor, centre: Tensor, dims: Tensor, delta: Tensor) -> Tensor:
    """(B,) bool: the leading dims x dims block of H is ``centre * I`` plus a nilpotent part, up to
    rounding: every power sum ``trace(N^k)``, k = 1..m, of ``N = H - centre I`` vanishes to within
    its rounding error (Newton's identities: then every eigenvalue of N is 0).

    A ring of Ritz values that passes is a single defective eigenvalue scattered by rounding; one
    that fails holds distinct eigenvalues (whose power sums do not cancel), and keeps its spread.
    """
    m = hess.shape[-1]
    lead = (torch.arange(m, device=hess.device)[None] < dims[:, None]).to(hess.dtype)  # (B, m)
    n = hess.to(centre.dtype) - centre[:, None, None] * torch.diag_embed(lead.to(centre.dtype))
    size = torch.linalg.matrix_norm(n).clamp_min(1e-300)  # (B,) Frobenius
    unit = n / size[:, None, None]
    rel = (delta.squeeze(1) / size).clamp_max(1.0)  # rounding of N relative to its size
    power, ok = unit, torch.ones_like(dims, dtype=torch.bool)
    for k in range(1, m + 1):
        trace = power.diagonal(dim1=1, dim2=2).sum(-1).abs()
        ok &= trace <= 16 * k * dims * rel
        if k < m:
            power = power @ unit
    return ok


def _ring_like(values: Tensor, centre: Tensor, weight: Tensor, size: Tensor) -> Tensor:
    """(B, m) bool: the cluster of Ritz value i (``weight`` (B, m, m) its members) looks like one
    defective eigenvalue perturbed by rounding. Its s members are then the roots of
    ``mu^s ~ delta`` around the centre, whose power sums ``sum mu^2``, ``sum mu^3`` vanish against
    ``sum |mu|^k`` (to O(delta^(1 - k/s))); a set of distinct eigenvalues gives O(1). Needs s >= 3
    (two points c +- r are a pair either way, and are kept apart)."""
    mu = values[:, None, :] - centre[:, :, None]  # (B, m, m): member j about cluster i's centre
    w = weight.to(values.dtype)
    ring = size >= 3
    for k in (2, 3):
        power = (w * mu**k).sum(2).abs()
        total = (weight * mu.abs() ** k).sum(2).clamp_min(1e-300)
        ring &= (power <= 0.1 * total) | (size <= k)
    return ring


def ritz_radius(hess: Tensor, beta: Tensor, eps: float, dims: Tensor | None = None,
                lost: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Spectral radius and its error bound from Arnoldi's H (B, m, m) and h_{m+1,m} (B,).

    ``dims`` (B,) is each sample's Krylov dimension (default m); the zero block of H after a
    sample's breakdown carries no Ritz values. ``lost`` (B,): the subdiagonal dropped at the
    breakdown, added to the rounding of H.

    Returns:
        (rho, error), both (B,) float64: rho the largest modulus of a Ritz-cluster mean; error
        the first-order bound of a single Ritz value (which covers an unconverged Krylov space
        through its residual), or for a cluster its spread over its size. After a breakdown
        (``beta == 0``: the Krylov space is invariant, H is the exact restriction of J) a
        top cluster that holds every Ritz value and passes ``_single_eigenvalue`` is one
        (defective) eigenvalue, the trace of H over the Krylov dimension: its error is the
        rounding of that mean (Kato's first-order bound with the spectral projector ``I``), not
        the spread of the ring rounding scatters it into (a nilpotent shift, a Jordan block).
    """
    m = hess.shape[-1]
    if dims is None:
        dims = torch.full(beta.shape, m, dtype=torch.long, device=beta.device)
    values, vectors = torch.linalg.eig(hess)  # (B, m), (B, m, m) complex
    lead = torch.arange(m, device=hess.device)[None] < dims[:, None]  # (B, m) rows in use
    weight_lead = (vectors.abs().square() * lead[:, :, None]).sum(1)  # (B, m) per eigenvector
    valid = weight_lead > 0.5  # eigenvectors of the dead block after breakdown carry no Ritz value
    kappa = _condition(vectors)
    delta = eps * torch.linalg.matrix_norm(hess)[:, None]  # (B, 1) rounding of H
    if lost is not None:
        delta = delta + lost.abs()[:, None]
    residual = beta.abs()[:, None] * vectors[:, -1, :].abs()  # (B, m) Ritz residuals
    spectral_scale = values.abs().amax(1, keepdim=True) + delta
    bound = torch.minimum(kappa * (delta + residual), spectral_scale)  # (B, m)
    gap = (values[:, :, None] - values[:, None, :]).abs()
    linked = gap <= 8 * (bound[:, :, None] + bound[:, None, :])
    linked &= (kappa > 1e3)[:, :, None] & (kappa > 1e3)[:, None, :]  # only ill-conditioned
    linked &= valid[:, :, None] & valid[:, None, :]
    linked |= torch.eye(m, dtype=torch.bool, device=values.device)
    member = _components(linked)  # (B, m, m): member[b, i, j] = j in i's cluster
    weight = member.to(values.real.dtype)
    size = weight.sum(2)  # (B, m)
    centre = torch.bmm(weight.to(values.dtype), values[:, :, None]).squeeze(2) / size
    spread = ((values[:, None, :] - centre[:, :, None]).abs() * weight).amax(2)
    # a ring of s Ritz values of radius R around a defective eigenvalue: its mean errs by ~R / s
    # A cluster's mean is its eigenvalue only when the cluster is one defective eigenvalue that
    # rounding scattered into a ring: the roots of (mu^s = delta) have vanishing power sums
    # sum mu^k (k < s), distinct eigenvalues do not (a 16-D Schur form with an upper part of norm
    # 8 in fp32 merges 0.90 with its neighbours into a mean of 0.63). Elsewhere the cluster
    # reports its largest member and the largest first-order bound among its members.
    ring = _ring_like(values, centre, weight, size)
    member_modulus = (values.abs()[:, None, :] * weight - (1 - weight)).amax(2)  # (B, m)
    member_bound = (bound[:, None, :] * weight).amax(2)
    distinct = (size > 1) & ~ring
    error = torch.where(size > 1, torch.where(ring, spread / size + delta, member_bound), bound)
    modulus = torch.where(distinct, member_modulus, centre.abs())
    modulus = torch.where(valid, modulus, torch.full_like(modulus, -1.0))
    top = modulus.argmax(1, keepdim=True)
    rho, err = modulus.gather(1, top).squeeze(1), error.gather(1, top).squeeze(1)
    whole = (member.gather(1, top[:, :, None].expand(-1, 1, m)).squeeze(1) | ~valid).all(1)
    exact = (beta == 0) & whole & (size.gather(1, top).squeeze(1) > 1)
    if bool(exact.any()):
        trace = hess.diagonal(dim1=1, dim2=2).sum(-1) / dims.clamp_min(1)  # (B,) exact mean
        mean = centre.gather(1, top).squeeze(1)
        exact &= _single_eigenvalue(hess, mean, dims, delta)
        rho = torch.where(exact, mean.abs(), rho)
        err = torch.where(exact, (mean - trace).abs() + 4 * delta.squeeze(1), err)
    return rho, err
