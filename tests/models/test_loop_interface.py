"""The step interface, parametrized over every architecture (and loops 1..4 where it applies)."""

from __future__ import annotations

import pytest
import torch
from _tiny import TINY, run_seeded
from torch.func import jvp

LOOPS = (1, 2, 3, 4)


@pytest.mark.parametrize("loops", LOOPS)
def test_output_shape_and_determinism(arch, loops):
    model = TINY.model(arch)
    toks = TINY.tokens()
    logits = run_seeded(model, toks, loops)
    assert logits.shape == (3, 10, 32)
    assert torch.isfinite(logits).all()
    assert torch.equal(run_seeded(model, toks, loops), logits)
    assert torch.equal(run_seeded(TINY.model(arch), toks, loops), logits)  # same seed, same weights


@pytest.mark.parametrize("loops", LOOPS)
def test_causal(arch, loops):
    model = TINY.model(arch)
    toks = TINY.tokens()
    changed = toks.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % 32
    base, other = run_seeded(model, toks, loops), run_seeded(model, changed, loops)
    assert torch.allclose(base[:, :6], other[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(base[:, 6:], other[:, 6:], atol=1e-4)


@pytest.mark.parametrize("loops", LOOPS)
def test_forward_equals_manual_loop(arch, loops):
    model = TINY.model(arch)
    toks = TINY.tokens()
    torch.manual_seed(9)
    ctx = model.prepare(toks)
    z = model.init_state(ctx)
    for k in range(loops):
        z = model.step(z, ctx, k)
        assert z.shape == (3, 10, 32)
    assert torch.equal(model.readout(z, ctx), run_seeded(model, toks, loops, seed=9))


@pytest.mark.parametrize("loops", (1, 3))
def test_capture_leaves_logits_unchanged(arch, loops):
    model = TINY.model(arch)
    toks = TINY.tokens()
    torch.manual_seed(3)
    ctx = model.prepare(toks, capture_attention=True)
    z = model.init_state(ctx)
    for k in range(loops):
        z = model.step(z, ctx, k)
    captured = model.readout(z, ctx)
    assert torch.allclose(captured, run_seeded(model, toks, loops, seed=3), atol=1e-5, rtol=0)
    loops_seen = {entry["loop"] for entry in ctx.attention}
    assert set(range(loops)) <= loops_seen
    for entry in ctx.attention:
        probs = entry["probs"]
        assert probs.shape == (3, 2, 10, 10)
        assert torch.allclose(probs.sum(-1), torch.ones(3, 2, 10), atol=1e-5)
        assert probs.triu(1).abs().max() == 0  # causal
    assert model.prepare(toks).attention is None


def test_parameters_independent_of_loops_and_not_lazy(arch):
    model = TINY.model(arch)
    before = {name: p.shape for name, p in model.named_parameters()}
    run_seeded(model, TINY.tokens(), 1)
    after_one = {name: p.shape for name, p in model.named_parameters()}
    run_seeded(model, TINY.tokens(), 4)
    assert before == after_one == {name: p.shape for name, p in model.named_parameters()}


def test_every_parameter_gets_a_gradient(arch):
    model = TINY.model(arch, dropout=0.0).train()
    toks = TINY.tokens()
    torch.manual_seed(0)
    ctx = model.prepare(toks)
    z = model.init_state(ctx)
    halt = 0.0
    for k in range(2):
        z = model.step(z, ctx, k)
        halt = halt + model.halt_logit(z, ctx).sigmoid().mean()
    logits = model.readout(z, ctx)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), toks.flatten()) + halt
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_halt_logit_shape_and_initial_probability(arch):
    model = TINY.model(arch)
    ctx = model.prepare(TINY.tokens())
    z = model.step(model.init_state(ctx), ctx, 0)
    prob = model.halt_logit(z, ctx).sigmoid()
    assert prob.shape == (3, 10)
    assert 0.02 < prob.mean() < 0.3


def test_sample_compaction_matches_full_batch(arch):
    model = TINY.model(arch)
    toks = TINY.tokens(batch=4)
    ctx = model.prepare(toks)
    z = model.step(model.init_state(ctx), ctx, 0)  # loop 0 on the full batch
    rows = torch.tensor([3, 1])
    sub = ctx.select(rows)
    for k in (1, 2):
        full = model.step(z, ctx, k)
        part = model.step(z[rows], sub, k)
        assert torch.allclose(part, full[rows], atol=1e-6, rtol=0)
        z = full
    assert torch.allclose(model.readout(z[rows], sub), model.readout(z, ctx)[rows], atol=1e-6)


@pytest.mark.parametrize("k", (0, 1))
def test_forward_mode_ad_through_step(arch, k):
    model = TINY.model(arch, attention="math")
    ctx = model.prepare(TINY.tokens())
    z = model.init_state(ctx)
    z = model.step(z, ctx, 0) if k else z
    direction = torch.randn_like(z)
    out, tangent = jvp(lambda state: model.step(state, ctx, k), (z,), (direction,))
    eps = 1e-3
    numeric = (model.step(z + eps * direction, ctx, k) - model.step(z - eps * direction, ctx, k))
    numeric = numeric / (2 * eps)
    assert torch.allclose(out, model.step(z, ctx, k), atol=1e-6)
    assert (tangent - numeric).norm() <= 1e-2 * numeric.norm() + 1e-4
    assert tangent.abs().max() > 0


def test_flops_count_attention(arch):
    model = TINY.model(arch)
    short, long = model.flops_per_token_step(4), model.flops_per_token_step(16)
    assert long > short > 0
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1"):
        model.flops_per_token_step(0)


def test_recurrent_depth_initial_state_is_seeded():
    model = TINY.model("recurrent_depth", init_scale=0.5)
    ctx = model.prepare(TINY.tokens())
    torch.manual_seed(4)
    first = model.init_state(ctx)
    torch.manual_seed(4)
    assert torch.equal(model.init_state(ctx), first)
    gen = torch.Generator().manual_seed(7)
    again = torch.Generator().manual_seed(7)
    assert torch.equal(model.init_state(ctx, generator=gen), model.init_state(ctx, generator=again))
    assert first.abs().max() <= 1.5 and 0.3 < first.std() < 0.6  # truncated at 3 std
    assert torch.equal(TINY.model("recurrent_depth", init_scale=0.0).init_state(ctx),
                       torch.zeros_like(first))
