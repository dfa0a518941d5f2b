"""One map serves every consumer; ``converged`` is a true statement about the returned z.

Ground truth is closed form: affine maps ``z -> A z + b`` have ``z* = (I - A)^{-1} b``.
"""

from __future__ import annotations

import math

import pytest
import torch

from fixedpoint import solve
from fixedpoint.maps import RowMap

NATIVE = ("fixed_point_iter", "anderson", "broyden")


def _tanh_problem(batch: int = 8, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, generator=gen)
    weight *= 0.7 / torch.linalg.matrix_norm(weight, 2)
    x = torch.randn(batch, dim, generator=gen)
    return weight, x


@pytest.mark.parametrize("solver", NATIVE)
def test_plain_closure_over_batch_tensors_solves_like_inputs(solver):
    # The torchdeq-style call that used to die with "size of tensor a (7) must match ... (8)".
    weight, x = _tanh_problem()
    z0 = torch.zeros_like(x)
    plain = solve(lambda z: torch.tanh(z @ weight.T + x), z0, solver=solver, tol=1e-6,
                  max_iter=300)
    given = solve(lambda z, x: torch.tanh(z @ weight.T + x), z0, inputs=(x,), solver=solver,
                  tol=1e-6, max_iter=300)
    assert plain.converged.all() and given.converged.all()
    assert torch.allclose(plain.z, given.z, atol=1e-5)
    true_residual = (torch.tanh(plain.z @ weight.T + x) - plain.z).norm(dim=1)
    assert (true_residual <= 1e-6 * torch.tanh(plain.z @ weight.T + x).norm(dim=1) * 1.01).all()
    # the inputs form stops rows early: fewer rows evaluated than the whole-batch fallback
    assert given.evaluations < plain.evaluations


def test_inputs_are_sliced_per_active_row_and_gradients_flow():
    weight, x = _tanh_problem(batch=6)
    x = x.requires_grad_()
    seen = []

    def f(z, x, scale):
        seen.append((z.shape[0], x.shape[0], scale.shape[0]))
        return torch.tanh(z @ weight.T + x) * scale

    scale = torch.linspace(0.2, 1.0, 6)[:, None]
    sol = solve(f, torch.zeros(6, 16), inputs=(x, scale), tol=1e-6, max_iter=200)
    assert all(a == b == c for a, b, c in seen)
    assert min(a for a, _, _ in seen) < 6  # rows really were dropped
    sol.z.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_inputs_name_the_argument():
    weight, x = _tanh_problem()
    with pytest.raises(ValueError, match=r"inputs\[0\] must have the batch size 8"):
        solve(lambda z, x: z, torch.zeros(8, 16), inputs=(x[:3],))
    with pytest.raises(TypeError, match="inputs"):
        solve(lambda z, x: z, torch.zeros(8, 16), inputs=(3,))


def test_row_map_refuses_a_closure_it_cannot_place_in_the_batch():
    x = torch.randn(8, 4)
    call = RowMap(lambda z: z * 0.5 + x, 8)
    with pytest.raises(ValueError, match="inputs="):
        call(torch.zeros(3, 4), torch.arange(3))


def test_deprecated_rows_form_still_solves():
    weight, x = _tanh_problem()
    sol = solve(lambda z, rows: torch.tanh(z @ weight.T + x[rows]), torch.zeros_like(x),
                tol=1e-6, max_iter=200)
    assert sol.converged.all()


def _non_normal_affine(dim: int, seed: int, dtype: torch.dtype):
    """A = Q (D + T) Q^T: eigenvalues spread in [-0.9, 0.9], strong non-normal part T."""
    gen = torch.Generator().manual_seed(seed)
    upper = 0.3 * torch.triu(torch.randn(dim, dim, generator=gen, dtype=torch.float64), 1)
    diag = torch.diag(torch.linspace(-0.9, 0.9, dim, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    a = q @ (diag + upper) @ q.T
    b = torch.randn(64, dim, generator=gen, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    z_star = torch.linalg.solve(eye - a, b.T).T  # closed-form fixed point
    resolvent = torch.linalg.matrix_norm(torch.linalg.inv(eye - a), 2)
    return a.to(dtype), b.to(dtype), z_star, float(resolvent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", NATIVE)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_converged_means_small_residual_at_the_returned_z(dtype, solver, stop_mode):
    a, b, z_star, resolvent = _non_normal_affine(24, 3, dtype)
    assert torch.linalg.matrix_norm(a.double(), 2) > 1.5  # non-normal: ||A|| > 1 > rho
    tol = 1e-4
    z0 = torch.zeros_like(b)
    sol = solve(lambda z, b: z @ a.T + b, z0, inputs=(b,), solver=solver, tol=tol,
                max_iter=400, stop_mode=stop_mode)
    assert sol.converged.sum() >= 32  # the guarantee below must not be vacuous
    z = sol.z.double()
    image = z @ a.double().T + b.double()
    residual = (image - z).norm(dim=1)
    if stop_mode == "rel":
        scale = torch.maximum(image.norm(dim=1), 1e-3 * b.double().norm(dim=1))
    else:
        scale = torch.full_like(residual, math.sqrt(z.shape[1]))
    slack = 1.01 if dtype == torch.float64 else 1.2  # fp32 rounding of the recomputation
    ok = sol.converged
    assert (residual[ok] <= tol * scale[ok] * slack).all()
    # and so the error against the closed-form fixed point is bounded by ||(I - A)^-1|| r
    error = (z - z_star).norm(dim=1)
    assert (error[ok] <= resolvent * tol * scale[ok] * slack + 1e-5 * z_star.norm(dim=1)[ok]).all()


def test_rel_reaches_a_fixed_point_at_zero():
    a, _, _, _ = _non_normal_affine(8, 5, torch.float64)
    z0 = torch.randn(16, 8, dtype=torch.float64)
    sol = solve(lambda z: z @ (0.9 * a / torch.linalg.matrix_norm(a, 2)).T, z0,
                solver="fixed_point_iter", tol=1e-4, max_iter=500)
    assert sol.converged.all()
    assert (sol.z.norm(dim=1) <= 1e-5 * z0.norm(dim=1)).all()
