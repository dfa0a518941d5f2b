"""spectral_radius on non-normal, defective and nilpotent Jacobians (issue 10, item 3).

Ground truth: ``torch.linalg.eigvals`` of the matrix in float64 (or, for Jordan blocks whose
float32 embedding perturbs the spectrum itself, the block's known eigenvalue).
"""

from __future__ import annotations

import math

import pytest
import torch

from fixedpoint import spectral_radius
from fixedpoint.systems import jordan_matrix, random_orthogonal


def _embed(matrix: torch.Tensor, dim: int = 64, seed: int = 0) -> torch.Tensor:
    q = random_orthogonal(dim, seed)
    big = torch.zeros(dim, dim, dtype=torch.float64)
    n = matrix.shape[0]
    big[:n, :n] = matrix.double()
    return q @ big @ q.T


def _radius(matrix: torch.Tensor, dtype: torch.dtype, **kw):
    a = matrix.to(dtype)
    z = torch.randn(3, a.shape[0], dtype=dtype)
    return spectral_radius(lambda z: z @ a.T, z, with_error=True, **kw)


def _truth(matrix: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(matrix.double()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size,eigenvalue", [(8, 0.9), (16, 0.95), (4, -0.8)])
def test_jordan_block_raw(dtype, size, eigenvalue):
    est = _radius(jordan_matrix(size, eigenvalue), dtype)
    tol = 0.02 if dtype == torch.float64 else 0.05
    assert (est.rho - abs(eigenvalue)).abs().max() < tol
    assert (est.rho < 1).all()  # a stable map is never reported unstable


@pytest.mark.parametrize("method", ["jvp", "vjp"])
def test_jordan_block_embedded_in_64d(method):
    matrix = _embed(jordan_matrix(8, 0.9))
    assert abs(_truth(matrix) - 0.9) < 0.02  # fp64 eigvals still resolve the block
    est = _radius(matrix, torch.float64, method=method)
    assert (est.rho - 0.9).abs().max() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nilpotent_shift_and_strictly_upper_triangular(dtype):
    shift = torch.diag(torch.ones(63, dtype=torch.float64), 1)
    upper = torch.triu(torch.randn(64, 64, generator=torch.Generator().manual_seed(2),
                                   dtype=torch.float64), 1)
    for matrix in (shift, upper):
        assert _truth(matrix) < 1e-6
        assert (_radius(matrix, dtype).rho < 0.05).all()
    nil4 = _embed(jordan_matrix(4, 0.0))
    assert (_radius(nil4, dtype).rho < 0.05).all()


@pytest.mark.parametrize("seed", range(4))
def test_non_normal_complex_pair_and_random_matrices_match_eigvals(seed):
    gen = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi * torch.rand((), generator=gen).item()
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)],
                             [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    basis = torch.tensor([[1.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    pair = 0.85 * basis @ rotation @ torch.linalg.inv(basis)
    dense = torch.randn(48, 48, generator=gen, dtype=torch.float64) / math.sqrt(48)
    for matrix in (pair, _embed(pair, seed=seed), dense, torch.roll(torch.eye(5), 1, 0)):
        truth = _truth(matrix)
        est = _radius(matrix, torch.float64)
        assert (est.rho - truth).abs().max() < 1e-3 * max(truth, 1)
        assert est.converged.all()
        assert ((est.rho - truth).abs() <= 3 * est.error + 1e-9).all()


def test_large_gaussian_matrix_is_close_to_eigvals():
    matrix = torch.randn(256, 256, generator=torch.Generator().manual_seed(5),
                         dtype=torch.float64) / 16
    truth = _truth(matrix)
    est = _radius(matrix, torch.float32)
    assert (est.rho - truth).abs().max() < 0.02


def test_parallel_loop_step_is_nilpotent_over_positions():
    from models import build_model

    torch.manual_seed(0)
    model = build_model("parallel_loop", vocab_size=16, max_seq_len=6, d_model=8, n_layers=1,
                        n_heads=2, clp=True, window=6).eval()
    assert model.nilpotent_step
    tokens = torch.randint(0, 16, (2, 6))
    with torch.no_grad():
        ctx = model.prepare(tokens)
        z = model.step(model.init_state(ctx), ctx, 0)
    one = ctx.select(torch.tensor([0]))
    jac = torch.autograd.functional.jacobian(lambda s: model.step(s[None], one, 1)[0], z[0])
    assert _truth(jac.reshape(48, 48)) < 1e-6  # dense ground truth: nilpotent
    for method in ("jvp", "vjp"):
        rho = spectral_radius(lambda z, c: model.step(z, c, 1), z, inputs=(ctx,), method=method)
        assert (rho < 0.05).all()


def _block(*blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*[b.double() for b in blocks])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nilpotent_breakdown_is_exact_and_converged(dtype):
    # Arnoldi breaks down after the nilpotency index: the Krylov space is invariant, H is J's exact
    # restriction and the radius is known to rounding, not to the ring eig scatters it into.
    gen = torch.Generator().manual_seed(3)
    shift = torch.diag(torch.ones(15, dtype=torch.float64), -1)
    upper = torch.triu(torch.randn(24, 24, generator=gen, dtype=torch.float64), 1)
    for matrix in (shift, upper):
        assert _truth(matrix) == 0.0  # eigvals of a triangular matrix: its zero diagonal
        est = _radius(matrix, dtype)
        assert est.converged.all()
        assert (est.rho <= 3 * est.error).all()
        assert (est.error < (1e-12 if dtype == torch.float64 else 1e-5)).all()
    embedded = _embed(jordan_matrix(8, 0.0))  # rank 7 in 64-D: breakdown after 8 steps
    ring = _truth(embedded)  # eigvals itself scatters the 8-fold zero (~eps^(1/8))
    assert 1e-4 < ring < 0.1
    est = _radius(embedded, torch.float64)
    assert est.converged.all() and (est.rho < 1e-10).all()


def test_defective_eigenvalue_after_breakdown_and_its_neighbours():
    jordan = _radius(jordan_matrix(8, 0.9), torch.float64)
    assert jordan.converged.all()
    assert ((jordan.rho - 0.9).abs() <= 3 * jordan.error).all() and (jordan.error < 1e-10).all()
    # a nilpotent block beside a well-conditioned eigenvalue: the radius is the latter's
    mixed = _embed(_block(jordan_matrix(6, 0.0), torch.tensor([[0.5, 0.3], [0.0, -0.2]])))
    truth = _truth(mixed)
    assert abs(truth - 0.5) < 1e-9
    est = _radius(mixed, torch.float64)
    assert est.converged.all() and ((est.rho - truth).abs() <= 3 * est.error + 1e-12).all()
    # two distinct eigenvalues 0.9 and 0.8 in one highly non-normal block are not one eigenvalue
    skew = torch.tensor([[0.9, 1e4], [0.0, 0.8]], dtype=torch.float64)
    est = _radius(skew, torch.float64)
    assert ((est.rho - 0.9).abs() <= 3 * est.error + 1e-9).all()


def test_nilpotent_beyond_the_krylov_dimension_is_not_converged():
    # a 200-step shift seen through 64 products is indistinguishable from a unit-modulus map:
    # the estimate may be anything in [0, 1], but it must not claim to be converged
    shift = torch.diag(torch.ones(199, dtype=torch.float64), -1)
    est = _radius(shift, torch.float64)
    assert not est.converged.any()
