"""The per-loop table's shared pass over a trajectory equals the four public functions, bit for
bit (the study's results tables must not change for the same seed)."""

from __future__ import annotations

import pytest
import torch

from experiments.evaluate.diagnostics import (
    _step_metrics,
    period2_return_error,
    relative_residual,
    update_coherence,
)


def _trajectories():
    gen = torch.Generator().manual_seed(0)
    walk = torch.randn(17, 40, 13, 64, generator=gen).cumsum(0)  # a wandering trajectory
    contracting = torch.randn(1, 9, 5, 8, generator=gen) * 0.5 ** torch.arange(33.0).view(
        -1, 1, 1, 1)  # shrinking updates, down to tiny norms
    cycle = torch.randn(1, 3, 4, 6, generator=gen) * (-1.0) ** torch.arange(9.0).view(-1, 1, 1, 1)
    return {"walk": walk, "contracting": contracting, "cycle": cycle, "two_states": walk[:2],
            "three_states": walk[:3]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(_trajectories()))
def test_shared_step_metrics_equal_the_public_functions(name, dtype):
    h = _trajectories()[name].to(dtype)
    got = _step_metrics(h)
    cos_prev, cos_total = update_coherence(h, dtype)
    want = {"relative_residual": relative_residual(h, dtype=dtype), "cos_prev": cos_prev,
            "cos_total": cos_total, "period2_return_error": period2_return_error(h, dtype)}
    assert list(got) == list(want)
    for metric, values in want.items():
        assert got[metric].dtype == values.dtype
        assert torch.equal(got[metric].nan_to_num(-7.0), values.nan_to_num(-7.0)), metric
        assert got[metric].isnan().sum() == values.isnan().sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_per_sample_equals_elementwise_isfinite(dtype):
    from experiments.evaluate.diagnostics import finite_per_sample

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(9, 12, 5, 7, generator=gen).to(dtype)
    h[3, 1, 2, 4] = float("nan")
    h[0, 4, 0, 0] = float("inf")
    h[8, 6, 4, 6] = -float("inf")
    h[2, 7, 1, 1] = torch.finfo(dtype).max  # huge but finite: still finite
    h[5, 9] = float("nan")  # a whole state
    want = torch.isfinite(h).flatten(start_dim=2).all(dim=2).all(dim=0)
    got = finite_per_sample(h)
    assert torch.equal(got, want)
    assert (~want).nonzero().flatten().tolist() == [1, 4, 6, 9]
