"""The evaluator's fast diagnostics (issue 14): CKA from one product equals the pairwise
definition, and float32 per-loop diagnostics stay within a stated bound of float64 ones."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _tiny import SMALL

from experiments.evaluate import diagnostics as dg

# the bound the README states: |float32 - float64| <= ATOL + RTOL * |float64| for every value
ATOL, RTOL = 1e-4, 1e-4


def _trajectory(loops: int = 24, batch: int = 48) -> torch.Tensor:
    model = SMALL.model("parallel_loop")
    tokens = SMALL.tokens(batch=batch)
    with torch.no_grad():
        ctx = model.prepare(tokens)
        z = model.init_state(ctx)
        states = [z]
        for k in range(loops):
            z = model.step(z, ctx, k)
            states.append(z)
    return torch.stack(states)  # float32, (K+1, B, T, D)


def _pairwise_cka(states: torch.Tensor) -> torch.Tensor:
    """CKA by its definition, pair by pair, in float64 (the reference)."""
    flat = states.double().reshape(states.shape[0], -1, states.shape[-1])
    return torch.stack([torch.stack([dg.linear_cka(a, b) for b in flat]) for a in flat])


def test_cka_matrix_equals_the_pairwise_definition():
    states = _trajectory(loops=10, batch=16)
    reference = _pairwise_cka(states)
    assert torch.allclose(dg.cka_matrix(states), reference, atol=1e-12, rtol=0)
    assert torch.allclose(dg.cka_matrix(states, dtype=torch.float32).double(), reference,
                          atol=1e-5, rtol=0)


def test_cka_matrix_in_bands_equals_one_product(monkeypatch):
    states = _trajectory(loops=10, batch=16)
    whole = dg.cka_matrix(states)
    monkeypatch.setattr(dg, "CKA_BLOCK_ENTRIES", 1)  # one state per band
    assert torch.allclose(dg.cka_matrix(states), whole, atol=1e-14, rtol=0)


def test_float32_diagnostics_are_within_the_stated_bound_of_float64():
    states = _trajectory()
    fast = dg.per_loop_table(states, dtype=torch.float32)
    exact = dg.per_loop_table(states)
    merged = pd.merge(exact, fast, on=["loop", "metric"], suffixes=("_64", "_32"))
    assert len(merged) == len(exact) == len(fast) > 100
    error = (merged["value_32"] - merged["value_64"]).abs()
    allowed = ATOL + RTOL * merged["value_64"].abs()
    worst = merged.assign(error=error)[error > allowed]
    assert worst.empty, worst.head()
    assert error.max() > 0  # float32 really ran


@pytest.mark.parametrize("fn", [dg.relative_residual, dg.period2_return_error])
def test_float64_stays_the_default(fn):
    states = _trajectory(loops=4, batch=4)
    assert fn(states).dtype == torch.float64
    assert fn(states, dtype=torch.float32).dtype == torch.float32
