"""transformers' native looped model ``hrm_text`` through ``models.hf.HrmLoop``: its H-cycles as
the loop, parity with ``HrmTextForCausalLM`` at the configured cycle count."""

from __future__ import annotations

import pytest
import torch
from _hf_tiny import VOCAB, ScriptedExit, count_step_rows, hf_model, saved, tokens

from halting import run_loop
from models.hf import HrmLoop, from_pretrained


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_configured_cycles_equal_hrm_text(attn, tmp_path):
    original, directory = saved("hrm_text", tmp_path, attn)
    model = from_pretrained(directory, attn_implementation=attn)
    assert isinstance(model, HrmLoop) and model.configured_loops == 2
    x = tokens()
    with torch.no_grad():
        want = original(x).logits
        got = model(x, loops=model.configured_loops)
        fewer = model(x, loops=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (fewer - want).abs().max() > 1e-3  # the loop count matters


def test_state_is_both_levels_and_unrolls_past_the_configured_cycles():
    model = HrmLoop(hf_model("hrm_text"))
    x = tokens(batch=2)
    assert model.d_model == 64  # [z_H; z_L], hidden 32 each
    with torch.no_grad():
        ctx = model.prepare(x)
        z = model.init_state(ctx)
        assert z.shape == (2, 12, 64)
        torch.testing.assert_close(z[..., :32], ctx.inject)  # z_H starts at the scaled embeds
        states = [z]
        for k in range(12):
            states.append(model.step(states[-1], ctx, k))
    assert all(bool(s.isfinite().all()) for s in states)
    assert (states[12][..., 32:] - states[11][..., 32:]).abs().max() > 0  # z_L keeps evolving


def test_causal_at_every_loop_count():
    model = HrmLoop(hf_model("hrm_text"))
    x = tokens(batch=2)
    changed = x.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB
    for loops in range(1, 5):
        with torch.no_grad():
            a, b = model(x, loops), model(changed, loops)
        assert torch.equal(a[:, :6], b[:, :6]), f"future token leaked at loops={loops}"
        assert (a[:, 6:] - b[:, 6:]).abs().max() > 0


def test_compaction_and_attention_capture():
    model = HrmLoop(hf_model("hrm_text"))
    x = tokens(batch=3)
    calls = count_step_rows(model)
    with torch.no_grad():
        out = run_loop(model, x, ScriptedExit(torch.tensor([2, 1, 3])), max_loops=3)
    assert calls == [3, 2, 1]
    assert out.depth.tolist() == [2, 1, 3]
    with torch.no_grad():
        ctx = model.prepare(x, capture_attention=True)
        model.step(model.init_state(ctx), ctx, 0)
    # two layers per stack: L_cycles=2 L-stack calls (layers 0-3), then the H stack (4, 5)
    assert [(e["loop"], e["layer"]) for e in ctx.attention] == [(0, i) for i in range(6)]
    assert ctx.attention[0]["probs"].shape == (3, 4, 12, 12)


def test_token_granularity_with_frozen_halted_positions():
    model = HrmLoop(hf_model("hrm_text"))
    x = tokens(batch=2)
    active = torch.zeros(2, 12, dtype=torch.bool)
    active[0, :4], active[1, :10] = True, True
    with torch.no_grad():
        ctx = model.prepare(x)
        z1 = model.step(model.init_state(ctx), ctx, 0)
        full = model.step(z1, ctx, 1)
        part = model.step(z1, ctx, 1, active=active)
        plan = torch.tensor([[1] * 6 + [2] * 6, [2] * 12])
        out = run_loop(model, x, ScriptedExit(plan), max_loops=2, granularity="token")
    # an active prefix sees only fresh keys/values: exactly the full step there
    torch.testing.assert_close(part[active], full[active], rtol=1e-5, atol=1e-5)
    assert torch.equal(part[~active], z1[~active])
    assert out.depth.tolist() == plan.tolist() and out.executed == 24 + 18
