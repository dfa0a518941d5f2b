"""The validation systems: known answers hold, embedding is an exact change of coordinates."""

from __future__ import annotations

import math

import pytest
import torch

from fixedpoint.spectral import lyapunov_exponent, spectral_radius
from fixedpoint.systems import SYSTEMS, System, all_systems, get_system, trajectory
from fixedpoint.verdicts import LABELS


def test_suite_covers_every_label_but_aperiodic():
    labels = {system.label for system in all_systems()}
    assert labels == set(LABELS) - {"aperiodic", "undetermined"}
    for system in all_systems():
        assert system.label in LABELS
        assert (system.period > 0) == (system.label == "periodic"), system.name
        assert system.name in SYSTEMS


def test_unknown_system_lists_known_names():
    with pytest.raises(KeyError, match="henon"):
        get_system("lorenz96")  # lorenz itself is registered now


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_trajectory_shape_dtype_and_first_state(system):
    states = trajectory(system, 5, 3, seed=1)
    assert states.shape == (5, 3, system.dim) and states.dtype == system.dtype
    torch.testing.assert_close(states[1], system.f(states[0]))
    torch.testing.assert_close(trajectory(system, 5, 3, seed=1), states)  # seeded
    assert not torch.equal(trajectory(system, 5, 3, seed=2)[0], states[0])


@pytest.mark.parametrize("name", ["logistic_3.5", "henon", "rotation_golden", "linear-1"])
def test_embedding_is_rotation_plus_offset_of_raw_trajectory(name):
    system = get_system(name)
    embedded = system.embed(16, seed=4)
    assert embedded.dim == 16 and embedded.name == f"{name}@16"
    q, offset = embedded.embedding["rotation"], embedded.embedding["offset"]
    torch.testing.assert_close(q.T @ q, torch.eye(16, dtype=q.dtype), atol=1e-5, rtol=0)
    raw = trajectory(system, 12, 4, seed=7)  # (K, B, d)
    lifted = trajectory(embedded, 12, 4, seed=7)  # (K, B, 16)
    back = (lifted - offset) @ q  # (K, B, 16) in the system's own coordinates, zero padded
    torch.testing.assert_close(back[..., : system.dim], raw, atol=1e-4, rtol=1e-4)
    assert back[..., system.dim :].abs().max() < 1e-4


def test_embed_rejects_smaller_dimension():
    with pytest.raises(ValueError, match="embedding dim"):
        get_system("tanh_contraction").embed(4)


def test_trajectory_rejects_bad_arguments():
    with pytest.raises(TypeError, match="System"):
        trajectory("henon", 4, 2)
    with pytest.raises(ValueError, match="steps"):
        trajectory(get_system("henon"), 0, 2)


def test_linear_maps_have_their_stated_eigenvalue():
    for eigenvalue in (0.5, -0.9, 0.995, -1.0, 1.05):
        system = get_system(f"linear{eigenvalue:+g}")
        rho = spectral_radius(system.f, torch.zeros(1, 3), 60)
        assert rho.item() == pytest.approx(abs(eigenvalue), rel=1e-3)


def test_logistic_regimes_land_on_their_cycles():
    for name, period in [("logistic_3.2", 2), ("logistic_3.5", 4), ("logistic_3.83", 3)]:
        states = trajectory(get_system(name), 400, 8, seed=0)
        assert (states[-1] - states[-1 - period]).abs().max() < 1e-8, name
        assert (states[-1] - states[-2]).abs().min() > 1e-2, name  # not a fixed point
    fixed = trajectory(get_system("logistic_2.8"), 400, 8, seed=0)[-1]
    torch.testing.assert_close(fixed, torch.full_like(fixed, 1 - 1 / 2.8))


def test_chaotic_systems_have_positive_lyapunov_exponent():
    for name, expected in [("logistic_4", math.log(2)), ("henon", 0.42)]:
        system = get_system(name).embed(8, seed=0)
        start = trajectory(system, 50, 4, seed=0)[-1]
        lyap = lyapunov_exponent(system.f, start, 400, warmup=10)
        assert lyap.mean().item() == pytest.approx(expected, abs=0.1), name


def test_systems_are_frozen_dataclasses():
    system = get_system("helix")
    assert isinstance(system, System)
    with pytest.raises(AttributeError):
        system.label = "periodic"
