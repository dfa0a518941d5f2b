"""Diagnostics against hand computations on small tensors."""

import math

import pytest
import torch

from experiments.evaluate import diagnostics as dg


def geometric_trajectory(ratio: float, loops: int = 6) -> torch.Tensor:
    """h_k = ratio^k * h_0 with h_0 all ones: (K+1, B=2, T=3, D=4)."""
    base = torch.ones(2, 3, 4)
    return torch.stack([base * ratio**k for k in range(loops + 1)])


def period2_trajectory(loops: int = 6) -> torch.Tensor:
    a, b = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 3, 4)
    b += 5.0
    return torch.stack([a if k % 2 == 0 else b for k in range(loops + 1)])


def test_relative_residual_of_geometric_sequence():
    # ||h_k - h_{k-1}|| / ||h_k|| = |r^k - r^{k-1}| / r^k = (1 - r) / r for r = 0.5 -> 1
    res = dg.relative_residual(geometric_trajectory(0.5))
    assert res.shape == (6,)
    assert torch.allclose(res, torch.ones(6, dtype=torch.float64))
    per_sample = dg.relative_residual(geometric_trajectory(0.8), per_sample=True)
    assert per_sample.shape == (2, 6)
    assert torch.allclose(per_sample, torch.full((2, 6), 0.25, dtype=torch.float64))


def test_period2_oscillation_has_cosine_minus_one_and_zero_return_error():
    states = period2_trajectory()
    cos_prev, cos_total = dg.update_coherence(states)
    assert math.isnan(cos_prev[0])
    assert torch.allclose(cos_prev[1:], torch.full((5,), -1.0, dtype=torch.float64))
    ret = dg.period2_return_error(states)
    assert math.isnan(ret[0]) and torch.all(ret[1:] < 1e-12)
    assert torch.all(dg.relative_residual(states) > 0.5)  # large residual: it does not converge
    # h_K - h_0 = b - a (K = 6 even -> h_6 = a) is zero: cos_total is 0 by the eps guard
    assert torch.allclose(cos_total, torch.zeros(6, dtype=torch.float64))


def test_cos_total_of_monotone_path_is_one():
    _, cos_total = dg.update_coherence(geometric_trajectory(0.5))
    assert torch.allclose(cos_total, torch.ones(6, dtype=torch.float64))


def test_attention_js_identical_zero_disjoint_ln2():
    p = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    assert dg.attention_js(p, p).item() == pytest.approx(0.0, abs=1e-12)
    one_hot_a = torch.zeros(2, 3, 4, 4)
    one_hot_a[..., 0] = 1
    one_hot_b = torch.zeros(2, 3, 4, 4)
    one_hot_b[..., 1] = 1
    assert dg.attention_js(one_hot_a, one_hot_b).item() == pytest.approx(math.log(2))
    q = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    assert 0 < dg.attention_js(p, q).item() < math.log(2)
    with pytest.raises(ValueError, match="differ"):
        dg.attention_js(p, q[..., :4])


@pytest.mark.parametrize("n", [1, 3, 8])
def test_effective_rank_of_identity_is_n(n):
    assert dg.effective_rank(torch.eye(n)).item() == pytest.approx(n)


def test_effective_rank_of_rank_one_matrix_is_one():
    x = torch.randn(10, 1) @ torch.randn(1, 6)
    assert dg.effective_rank(x).item() == pytest.approx(1.0, abs=1e-6)


def test_participation_ratio_isotropic_and_one_direction():
    iso = torch.randn(20000, 8, generator=torch.Generator().manual_seed(1))
    assert dg.participation_ratio(iso).item() == pytest.approx(8.0, rel=0.05)
    line = torch.randn(500, 1) * torch.tensor([[1.0, 2.0, -1.0]])
    assert dg.participation_ratio(line).item() == pytest.approx(1.0, abs=1e-6)


def test_linear_cka_orthogonal_invariance_and_independence():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    assert dg.linear_cka(x, x @ q).item() == pytest.approx(1.0, abs=1e-10)
    assert dg.linear_cka(x, 3.0 * x + 1.0).item() == pytest.approx(1.0, abs=1e-10)
    y = torch.randn(200, 6, generator=gen)
    assert dg.linear_cka(x, y).item() < 0.2


def test_cka_matrix_symmetric_unit_diagonal_and_matches_pairwise():
    states = torch.randn(4, 2, 5, 6, generator=torch.Generator().manual_seed(3))
    matrix = dg.cka_matrix(states)
    assert matrix.shape == (4, 4)
    assert torch.allclose(matrix, matrix.T)
    assert torch.allclose(matrix.diagonal(), torch.ones(4, dtype=torch.float64))
    assert matrix[1, 3].item() == pytest.approx(dg.linear_cka(states[1], states[3]).item())


def test_logit_lens_kl_zero_for_final_and_matches_hand_value():
    final = torch.randn(2, 3, 5)
    other = torch.randn(2, 3, 5)
    kl = dg.logit_lens_kl(torch.stack([other, final]), final, chunk_rows=4)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-12)
    p, log_p, log_q = final.softmax(-1), final.log_softmax(-1), other.log_softmax(-1)
    expected = (p * (log_p - log_q)).sum(-1).mean().item()
    assert kl[0].item() == pytest.approx(expected, rel=1e-5)


def test_distance_to_final_and_pca_portrait_shapes():
    states = geometric_trajectory(0.5, loops=4)
    dist = dg.distance_to_final(states)
    assert dist.shape == (2, 3, 4)
    # ||h_k - h_4|| per token = (0.5^k - 0.5^4) * sqrt(4)
    expected = torch.tensor([(0.5**k - 0.5**4) * 2 for k in range(1, 5)], dtype=torch.float64)
    assert torch.allclose(dist[0, 0], expected)
    coords = dg.pca_portrait(torch.randn(5, 2, 3, 4), tail=3)
    assert coords.shape == (5, 2, 3, 2)


def test_per_loop_table_rows():
    gen = torch.Generator().manual_seed(4)
    states = torch.randn(4, 2, 5, 8, generator=gen)
    attention = [{"loop": k, "layer": 0, "kind": "full",
                  "probs": torch.softmax(torch.randn(2, 2, 5, 5, generator=gen), -1)}
                 for k in range(3)]
    step_logits = torch.randn(3, 2, 5, 7, generator=gen)
    targets = step_logits[-1].argmax(-1)
    table = dg.per_loop_table(states, attention=attention, step_logits=step_logits,
                              targets=targets)
    assert list(table.columns) == ["loop", "metric", "value"]
    metrics = set(table["metric"])
    for name in ["relative_residual", "cos_prev", "cos_total", "period2_return_error",
                 "attention_js", "effective_rank", "participation_ratio", "logit_lens_kl",
                 "accuracy_at_loop", "cka@1", "cka@3"]:
        assert name in metrics, name
    assert table["loop"].min() == 1 and table["loop"].max() == 3
    acc = table[table["metric"] == "accuracy_at_loop"].set_index("loop")["value"]
    assert acc[3] == 1.0  # the last loop's argmax are the targets
    js = table[table["metric"] == "attention_js"]
    assert sorted(js["loop"]) == [2, 3]  # loop 1 has no previous attention
    assert not table["value"].isna().any()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        dg.relative_residual(torch.zeros(3, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        dg.relative_residual(torch.zeros(1, 2, 2, 2))


def test_low_precision_inputs_accumulate_in_float64():
    states = geometric_trajectory(0.5).to(torch.bfloat16)
    res = dg.relative_residual(states)
    assert res.dtype == torch.float64 and torch.allclose(res, torch.ones(6, dtype=torch.float64))
    table = dg.per_loop_table(states, step_logits=torch.randn(6, 2, 3, 5).half())
    assert (table["metric"] == "logit_lens_kl").sum() == 6
