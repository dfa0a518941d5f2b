"""classify on the hard cases of issue 10: transient growth, slow flows, measured noise floors.

Ground truth is independent of classify: spectral radii from ``torch.linalg.eigvals``, a
long-run Lyapunov exponent by QR (Benettin with re-orthonormalisation of a full tangent frame),
and periods checked by iterating in float64.
"""

from __future__ import annotations

import pytest
import torch
from _ground_truth import qr_lyapunov

from fixedpoint import LABELS, classify
from fixedpoint.systems import get_system, jordan_matrix, trajectory

K = 256
WRONG_FOR_A_CONTRACTION = {"drifting", "diverging", "chaotic", "quasi_periodic"}


def _noisy(states: torch.Tensor, sigma: float, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return states + sigma * torch.randn(states.shape, generator=gen, dtype=states.dtype)


def test_undetermined_is_a_label():
    assert "undetermined" in LABELS


@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize("embed", [False, True])
def test_jordan_transient_growth_is_a_contraction(size, embed):
    truth = float(torch.linalg.eigvals(jordan_matrix(size, 0.95)).abs().max())
    system = get_system(f"jordan{size}_0.95")
    if embed:
        system = system.embed(64, seed=3)
    states = trajectory(system, K, 16, seed=1)
    growth = states.flatten(2).norm(dim=-1).amax(0) / states[0].flatten(1).norm(dim=-1)
    assert (growth > 1e3).all()  # the transient really grows
    verdicts = classify(states, f=system.f)
    assert not set(verdicts.label) & WRONG_FOR_A_CONTRACTION, verdicts.label
    assert (verdicts.label == "converging").mean() >= 0.9
    assert (verdicts.spectral_radius - truth).abs().max() < 0.03


@pytest.mark.slow  # ~1400 tangent steps of RK4 and a 1000-step QR ground truth
def test_lorenz_is_chaotic_relative_to_its_own_time_scale():
    system = get_system("lorenz")
    states = trajectory(system, K, 2, seed=2)
    truth = qr_lyapunov(system.f, states[-1, :1], 1000)
    assert 0.006 < truth < 0.012  # ~0.9 per time unit at dt = 0.01
    verdicts = classify(states, f=system.f)
    assert (verdicts.label == "chaotic").all(), verdicts.label
    assert (verdicts.lyapunov - truth).abs().max() < 0.005


@pytest.mark.parametrize("r,period", [(3.2, 2), (3.5, 4), (3.56, 8), (3.83, 3)])
def test_noisy_embedded_logistic_cycles_stay_periodic(r, period):
    system = get_system(f"logistic_{r:g}").embed(64, seed=5)
    states = _noisy(trajectory(system, K, 16, seed=0), 1e-4)
    for f in (None, system.f):
        verdicts = classify(states, f=f)
        assert (verdicts.label == "periodic").all(), verdicts.label
        assert (verdicts.period == period).all(), verdicts.period


def test_noisy_slow_contraction_is_converging_not_drifting():
    system = get_system("slow_contraction").embed(64, seed=2)
    clean = trajectory(system, K, 16, seed=0)
    for states in (clean, _noisy(clean, 1e-4)):
        for f in (None, system.f):
            labels = classify(states, f=f).label
            assert (labels == "converging").all(), labels


def test_translation_with_noise_still_drifts():
    system = get_system("translation").embed(64, seed=2)
    states = _noisy(trajectory(system, K, 8, seed=0), 1e-4)
    assert (classify(states, f=system.f).label == "drifting").all()


@pytest.mark.parametrize("name", ["linear+0.5", "tanh_contraction", "spiral_fast"])
def test_noisy_fixed_points_are_converged(name):
    system = get_system(name).embed(64, seed=4)
    states = _noisy(trajectory(system, K, 8, seed=0), 1e-4)
    assert (classify(states).label == "converged").all()


@pytest.mark.parametrize("name", ["logistic_4", "henon", "tent_1.9", "standard_sea"])
def test_noisy_chaos_is_not_called_periodic(name):
    system = get_system(name).embed(64, seed=6)
    states = _noisy(trajectory(system, K, 8, seed=0), 1e-4)
    verdicts = classify(states, f=system.f)
    assert not (verdicts.label == "periodic").any(), verdicts.label
    assert (verdicts.label == "chaotic").mean() >= 0.75, verdicts.label


def test_henon_and_logistic_windows_raw():
    for name, period in (("henon_1", 4), ("henon_1.25", 7), ("logistic_3.74", 5)):
        system = get_system(name)
        verdicts = classify(trajectory(system, K, 8, seed=0), f=system.f)
        assert (verdicts.label == "periodic").all() and (verdicts.period == period).all(), name
