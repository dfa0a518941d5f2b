"""Spectral radius (power iteration) and finite-time Lyapunov exponents, known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fixedpoint.spectral import lyapunov_exponent, spectral_radius


def rotation(angle: float, scale: float = 1.0) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return scale * torch.tensor([[c, -s], [s, c]])


def batched_linear(matrices: torch.Tensor):
    """z -> A_b z per sample for (B, d, d) matrices."""
    return lambda z: torch.bmm(matrices, z.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("method", ["jvp", "vjp"])
def test_diagonal_maps_per_sample(method):
    diag = torch.tensor([[0.5, -0.2, 0.1], [0.3, -0.95, 0.2], [1.2, 0.1, -0.4]])
    rho = spectral_radius(lambda z: z * diag, torch.randn(3, 3), 30, method=method)
    torch.testing.assert_close(rho, diag.abs().amax(1), rtol=0.02, atol=0)


@pytest.mark.parametrize("method", ["jvp", "vjp"])
def test_rotation_pair_scaled_gives_modulus_not_rayleigh_quotient(method):
    a = rotation(2 * math.pi / 5, 0.9)
    z = torch.zeros(4, 2)
    rho = spectral_radius(lambda x: x @ a.T, z, 30, method=method)
    torch.testing.assert_close(rho, torch.full((4,), 0.9), rtol=0.02, atol=0)
    rayleigh = 0.9 * math.cos(2 * math.pi / 5)  # what a Rayleigh quotient would report
    assert (rho - rayleigh).abs().min() > 0.5


def test_nonnormal_spectra():
    matrices = torch.stack(
        [
            torch.tensor([[0.5, 3.0], [0.0, 0.8]]),  # nonnormal, ||A|| ~ 3.1, rho 0.8
            torch.tensor([[-0.9, 5.0], [0.0, 0.3]]),
            torch.tensor([[0.2, 0.0], [10.0, 0.6]]),
        ]
    )
    rho = spectral_radius(batched_linear(matrices), torch.zeros(3, 2), 30)
    torch.testing.assert_close(rho, torch.tensor([0.8, 0.9, 0.6]), rtol=0.02, atol=0)


def test_complex_pair_in_skewed_basis_needs_more_iterations():
    # ||A^n v|| oscillates by up to cond(S) around rho^n: the geometric mean over the last
    # iters/2 steps errs by <= ln cond(S) / (iters/2) (documented), so give it more iterations.
    skew = torch.tensor([[1.0, 0.8], [0.0, 0.6]])
    a = skew @ rotation(2 * math.pi / 7, 0.7) @ torch.linalg.inv(skew)
    cond = torch.linalg.cond(skew).item()
    for iters in (30, 300):
        rho = spectral_radius(lambda z: z @ a.T, torch.zeros(2, 2), iters)
        bound = math.log(cond) / (iters // 2)
        assert ((rho.log() - math.log(0.7)).abs() <= bound).all(), (iters, rho)
    assert ((rho - 0.7).abs() < 0.02 * 0.7).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tanh_map_at_zero_has_radius_of_weight(seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 16, generator=gen) / 4
    expected = torch.linalg.eigvals(weight).abs().max()
    rho = spectral_radius(lambda z: torch.tanh(z @ weight.T), torch.zeros(2, 16), 100)
    torch.testing.assert_close(rho, expected.expand(2), rtol=0.02, atol=0)


def test_jvp_and_vjp_agree_on_a_nonlinear_map():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 8, generator=gen) / 3
    z = torch.randn(5, 8, generator=gen)
    f = lambda x: torch.tanh(x @ weight.T + 0.3)
    forward = spectral_radius(f, z, 80, method="jvp")
    reverse = spectral_radius(f, z, 80, method="vjp")
    torch.testing.assert_close(forward, reverse, rtol=0.02, atol=0)


def attention_map(weights: torch.Tensor):
    """A tiny self-attention block on (B, T, D) built on fused SDPA (no forward AD on CPU)."""

    def f(z: torch.Tensor) -> torch.Tensor:
        q, k, v = (z @ weights[i] for i in range(3))  # (B, T, D) each
        attended = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return torch.tanh(z + attended)

    return f


def test_attention_map_falls_back_to_vjp_and_matches_true_jacobian():
    gen = torch.Generator().manual_seed(0)
    weights = 0.3 * torch.randn(3, 16, 16, generator=gen)
    f = attention_map(weights)
    z = torch.randn(3, 6, 16, generator=gen)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(f, (z,), (z,))  # the fault the fallback exists for (pytorch#128971)
    rho = spectral_radius(f, z, 100)  # method="jvp" must fall back silently
    jacobian = torch.autograd.functional.jacobian(f, z)  # (B, T, D, B, T, D)
    expected = torch.stack(
        [torch.linalg.eigvals(jacobian[b, :, :, b].reshape(96, 96)).abs().max() for b in range(3)]
    )
    torch.testing.assert_close(rho, expected, rtol=0.02, atol=0)
    torch.testing.assert_close(spectral_radius(f, z, 100, method="vjp"), rho)


def test_no_gradient_leaks_into_caller_graph():
    layer = torch.nn.Linear(4, 4)
    z = torch.randn(3, 4, requires_grad=True)
    rho = spectral_radius(lambda x: torch.tanh(layer(x)), z * 2, 10, method="vjp")
    lyap = lyapunov_exponent(lambda x: torch.tanh(layer(x)), z, 5, method="vjp")
    assert rho.grad_fn is None and lyap.grad_fn is None
    assert z.grad is None and all(p.grad is None for p in layer.parameters())


def test_rows_parameter_is_called_with_every_row():
    # issue 10: rows=None crashed maps written in the documented f(z, rows) form (x[rows])
    seen = []

    def f(z, rows=0):
        seen.append(rows)
        return 0.5 * z

    spectral_radius(f, torch.ones(2, 3), 4)
    assert seen and all(torch.equal(rows, torch.arange(2)) for rows in seen)


def test_period_gives_floquet_multiplier_of_logistic_two_cycle():
    r = 3.2
    # 2-cycle of r x (1 - x): roots of r^2 x^2 - r(r+1) x + (r+1) = 0; multiplier 4 + 2r - r^2.
    disc = math.sqrt((r + 1) * (r - 3))
    cycle_point = torch.tensor([[(r + 1 + disc) / (2 * r)]], dtype=torch.float64)
    f = lambda x: r * x * (1 - x)
    rho = spectral_radius(f, cycle_point, 10, period=2)
    assert rho.item() == pytest.approx(math.sqrt(abs(4 + 2 * r - r * r)), rel=1e-6)


def test_lyapunov_logistic_r4_is_ln2():
    gen = torch.Generator().manual_seed(0)
    z0 = 0.1 + 0.8 * torch.rand(16, 1, generator=gen, dtype=torch.float64)
    lyap = lyapunov_exponent(lambda x: 4 * x * (1 - x), z0, 1000, warmup=20)
    assert (lyap - math.log(2)).abs().max() < 0.1
    assert lyap.mean().item() == pytest.approx(math.log(2), abs=0.03)


def test_lyapunov_of_contraction_is_its_log_rate_and_methods_agree():
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(4, 3, generator=gen)
    f = lambda x: 0.5 * x + 0.1
    for method in ("jvp", "vjp"):
        lyap = lyapunov_exponent(f, z0, 20, method=method)
        torch.testing.assert_close(lyap, torch.full((4,), math.log(0.5)), rtol=1e-4, atol=1e-4)


def test_lyapunov_henon_and_methods_agree():
    def henon(x):
        return torch.stack([1 - 1.4 * x[:, 0] ** 2 + x[:, 1], 0.3 * x[:, 0]], dim=1)

    z0 = torch.tensor([[0.1, 0.0], [0.0, 0.05]], dtype=torch.float64)
    forward = lyapunov_exponent(henon, z0, 600, warmup=50, method="jvp")
    reverse = lyapunov_exponent(henon, z0, 600, warmup=50, method="vjp")
    assert ((forward - 0.42).abs() < 0.06).all(), forward
    assert ((reverse - 0.42).abs() < 0.06).all(), reverse


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "fwd"}, "method"),
        ({"iters": 1}, "iters"),
        ({"period": 0}, "period"),
    ],
)
def test_spectral_radius_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectral_radius(lambda z: z, torch.zeros(2, 2), **kwargs)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="callable"):
        spectral_radius("not a map", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="steps"):
        lyapunov_exponent(lambda z: z, torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match="z0"):
        lyapunov_exponent(lambda z: z, torch.zeros(0, 2), 3)
