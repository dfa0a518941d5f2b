"""Gradients through solve: implicit vs dense exact, gradcheck, phantom, unroll, graph memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fixedpoint.solve import solve

D = 5


def problem(batch: int = 4, norm: float = 0.6, seed: int = 0, mixed: bool = False):
    """Parameters (W, x) in float64 requiring grad; ``mixed`` makes rows of unequal difficulty."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=gen, dtype=torch.float64)
    w = (norm * w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
    x = torch.randn(batch, D, generator=gen, dtype=torch.float64).requires_grad_()
    scale = torch.tensor([0.2 if mixed and i % 2 == 0 else 1.0 for i in range(batch)],
                         dtype=torch.float64)
    return w, x, scale


def tanh_map(w: torch.Tensor, x: torch.Tensor, scale: torch.Tensor):
    def f(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh(scale[rows, None] * (z @ w.T) + x[rows])

    return f


def dense_implicit_grads(w, x, scale, z_star, weights):
    """d(sum(weights * z*))/d(W, x) with (I - J)^{-1} formed densely per sample."""
    with torch.enable_grad():
        w_, x_ = w.detach().requires_grad_(), x.detach().requires_grad_()
        pre = scale[:, None] * (z_star @ w_.T) + x_
        image = torch.tanh(pre)  # (B, D) = f(z*) with z* fixed
        adj = []
        for b in range(z_star.shape[0]):
            jac = (1 - image[b].detach() ** 2)[:, None] * (scale[b] * w.detach())  # (D, D)
            adj.append(torch.linalg.solve((torch.eye(D, dtype=w.dtype) - jac).T, weights[b]))
        grads = torch.autograd.grad(image, (w_, x_), torch.stack(adj))
    return grads


@pytest.mark.parametrize("solver", ["anderson", "fixed_point_iter", "broyden"])
@pytest.mark.parametrize("mixed", [False, True])
def test_implicit_gradient_matches_dense_exact(solver: str, mixed: bool) -> None:
    w, x, scale = problem(mixed=mixed)
    sol = solve(tanh_map(w, x, scale), torch.zeros(4, D, dtype=torch.float64), solver=solver,
                tol=1e-13, max_iter=300, stop_mode="abs", adjoint_tol=1e-13)
    weights = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grad_w, grad_x = torch.autograd.grad((sol.z * weights).sum(), (w, x))
    exact_w, exact_x = dense_implicit_grads(w, x, scale, sol.z.detach(), weights)
    torch.testing.assert_close(grad_w, exact_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_x, exact_x, rtol=0, atol=1e-6)
    adjoint = sol.adjoint
    assert adjoint is not None and adjoint.converged.all()
    if mixed:  # the adjoint stops per sample too: easy rows (contraction 0.2) stop first
        assert adjoint.steps[0::2].max() < adjoint.steps[1::2].min()


def test_implicit_gradient_passes_gradcheck() -> None:
    w, x, scale = problem(batch=2)

    def fixed_point(w_: torch.Tensor, x_: torch.Tensor) -> torch.Tensor:
        return solve(tanh_map(w_, x_, scale), torch.zeros(2, D, dtype=torch.float64),
                     solver="anderson", tol=1e-14, max_iter=200, stop_mode="abs",
                     adjoint_tol=1e-14).z

    assert torch.autograd.gradcheck(fixed_point, (w, x), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backward", ["phantom", "one_step"])
def test_phantom_gradients_approximate_the_exact_one(backward: str) -> None:
    w, x, scale = problem(norm=0.3)
    f = tanh_map(w, x, scale)
    z0 = torch.zeros(4, D, dtype=torch.float64)
    exact = solve(f, z0, tol=1e-12, stop_mode="abs", adjoint_tol=1e-12)
    approx = solve(f, z0, tol=1e-12, stop_mode="abs", backward=backward)
    assert torch.equal(exact.z, approx.z)  # the value is z* whatever the backward
    exact_w = torch.autograd.grad(exact.z.sum(), w)[0].flatten()
    approx_w = torch.autograd.grad(approx.z.sum(), w)[0].flatten()
    assert F.cosine_similarity(exact_w, approx_w, dim=0) > 0.9
    assert not torch.allclose(exact_w, approx_w, rtol=0, atol=1e-8)


def test_unroll_matches_autograd_through_a_hand_loop() -> None:
    w, x, scale = problem(mixed=True)
    f = tanh_map(w, x, scale)
    z0 = torch.zeros(4, D, dtype=torch.float64)
    sol = solve(f, z0, solver="fixed_point_iter", tol=1e-6, max_iter=100, stop_mode="abs",
                backward="unroll")
    assert len(set(sol.steps.tolist())) > 1  # rows stopped at different steps
    grad_w = torch.autograd.grad(sol.z.sum(), w)[0]
    rows = torch.arange(4)
    expected = torch.zeros_like(w)
    for row in range(4):  # z_{n-1} = f^{n-1}(z0): the iterate whose residual met tol
        z = z0[row:row + 1]
        for _ in range(int(sol.steps[row]) - 1):
            z = f(z, rows[row:row + 1])
        expected += torch.autograd.grad(z.sum(), w)[0]
    torch.testing.assert_close(grad_w, expected, rtol=1e-10, atol=1e-12)


def test_unroll_refuses_in_place_solvers() -> None:
    w, x, scale = problem()
    with pytest.raises(ValueError, match="unroll.*anderson"):
        solve(tanh_map(w, x, scale), torch.zeros(4, D, dtype=torch.float64), backward="unroll")


def saved_tensor_count(backward: str, max_iter: int) -> int:
    w, x, scale = problem(norm=0.95)
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sol = solve(tanh_map(w, x, scale), torch.zeros(4, D, dtype=torch.float64),
                    solver="fixed_point_iter", tol=1e-15, max_iter=max_iter, backward=backward)
    assert int(sol.steps.max()) == max_iter  # the solve really ran max_iter steps
    return count


def test_implicit_graph_does_not_grow_with_iterations() -> None:
    assert saved_tensor_count("implicit", 5) == saved_tensor_count("implicit", 40)
    assert saved_tensor_count("phantom", 5) == saved_tensor_count("phantom", 40)
    assert saved_tensor_count("unroll", 5) < saved_tensor_count("unroll", 40)  # the probe works


def test_no_graph_when_nothing_needs_grad() -> None:
    w, x, scale = problem()
    f = tanh_map(w.detach(), x.detach(), scale)
    sol = solve(f, torch.zeros(4, D, dtype=torch.float64))
    assert not sol.z.requires_grad
    with torch.no_grad():
        sol = solve(tanh_map(w, x, scale), torch.zeros(4, D, dtype=torch.float64))
    assert not sol.z.requires_grad


@pytest.mark.parametrize("kwargs,match", [
    ({"phantom_tau": 0.0}, "phantom_tau"),
    ({"adjoint_tol": -1.0}, "adjoint_tol"),
    ({"adjoint_max_iter": 0}, "adjoint_max_iter"),
])
def test_bad_backward_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        solve(lambda z: 0.5 * z, torch.ones(2, 3), **kwargs)
