"""Retrofitted recurrence on transformers decoders (``models.hf.RetrofitLoop``): parity with the
original model at one loop, causality, compaction through ``run_loop``, attention capture,
unrolling to 64 loops and classifying."""

from __future__ import annotations

import pytest
import torch
from _hf_tiny import FAMILIES, VOCAB, ScriptedExit, count_step_rows, hf_model, saved, tokens

from fixedpoint import classify
from halting import run_loop
from models import build_model
from models.hf import RetrofitLoop, from_pretrained


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_loop_without_injection_is_the_original_model(family, attn, tmp_path):
    original, directory = saved(family, tmp_path, attn)
    model = from_pretrained(directory, loop_layers=(1, 3), attn_implementation=attn)
    assert model.hf.config._attn_implementation == attn
    x = tokens()
    with torch.no_grad():
        want = original(x).logits
        got = model(x, loops=1)
    assert got.shape == (3, 12, VOCAB)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with torch.no_grad():  # a second loop really reapplies the core
        assert (model(x, loops=2) - want).abs().max() > 1e-3


@pytest.mark.parametrize("injection", ["add", "concat"])
def test_every_injection_starts_at_the_original_model(injection):
    original = hf_model("llama")
    model = RetrofitLoop(original, (1, 3), injection).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x, loops=1), original(x).logits, rtol=0, atol=1e-5)
        z0 = model.init_state(model.prepare(x))
    assert bool((z0 == 0).all())
    assert (model.adapter is not None) == (injection == "concat")


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_at_every_loop_count(family):
    model = RetrofitLoop(hf_model(family), (1, 3), "add").eval()
    x = tokens(batch=2)
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    for loops in range(1, 5):
        with torch.no_grad():
            a, b = model(x, loops), model(changed, loops)
        assert torch.equal(a[:, :7], b[:, :7]), f"future token leaked at loops={loops}"
        assert (a[:, 7:] - b[:, 7:]).abs().max() > 0


def test_compaction_does_not_recompute_halted_rows():
    model = RetrofitLoop(hf_model("qwen2"), (1, 3)).eval()
    x = tokens(batch=4)
    plan = torch.tensor([1, 3, 2, 4])
    calls = count_step_rows(model)
    with torch.no_grad():
        out = run_loop(model, x, ScriptedExit(plan), max_loops=4)
    assert calls == [4, 3, 2, 1]  # rows still running at each step
    assert out.depth.tolist() == plan.tolist()
    assert out.executed == int(plan.sum())
    for row, loops in enumerate(plan.tolist()):  # each row's logits are its own exit's
        with torch.no_grad():
            alone = model(x[row: row + 1], loops)
        torch.testing.assert_close(out.logits[row: row + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_token_granularity_computes_only_running_tokens(family):
    model = RetrofitLoop(hf_model(family), (1, 3), "add").eval()
    x = tokens(batch=2)
    plan = torch.tensor([[1] * 6 + [3] * 6, [2] * 12])  # row 1 leaves the batch after loop 2
    with torch.no_grad():
        out = run_loop(model, x, ScriptedExit(plan), max_loops=3, granularity="token")
    assert out.depth.tolist() == plan.tolist()
    assert out.executed == 24 + 18 + 6  # every token, then the running ones only
    assert bool(out.logits.isfinite().all())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_frozen_prefix_matches_transformers_kv_cache(attn):
    """Halted prefix, running suffix: the suffix must see the prefix's keys/values from the
    previous loop — exactly what transformers' own DynamicCache gives incremental decoding."""
    from transformers import DynamicCache

    original = hf_model("llama", attn=attn)
    model = RetrofitLoop(original, (1, 3)).eval()
    x, p = tokens(batch=2), 7
    active = torch.zeros(2, 12, dtype=torch.bool)
    active[:, p:] = True
    with torch.no_grad():
        ctx = model.prepare(x)
        z0 = model.init_state(ctx)
        z1 = model.step(z0, ctx, 0)
        z2 = model.step(z1, ctx, 1, active=active)
        cache = DynamicCache(config=original.config)
        body = original.model
        for part, h in ((slice(0, p), z0), (slice(p, 12), z1)):
            pos = torch.arange(12)[part].unsqueeze(0)
            h = h[:, part]
            seen = torch.arange(pos.max() + 1)  # keys cached so far plus these queries
            mask = (seen <= pos.view(-1, 1)).view(1, 1, -1, seen.numel())
            if attn == "eager":
                mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo().min)
            rope = body.rotary_emb(h, pos)
            for layer in body.layers[1:3]:
                h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=pos,
                          past_key_values=cache, use_cache=True)
        recomputed = model.step(z1, ctx, 1)[:, p:]  # the prefix recomputed from z1 instead
    assert torch.equal(z2[:, :p], z1[:, :p])  # halted positions keep their state exactly
    torch.testing.assert_close(z2[:, p:], h, rtol=1e-5, atol=1e-5)
    assert (recomputed - h).abs().max() > 1e-3  # so the check tells frozen from recomputed


def test_frozen_suffix_leaves_the_prefix_as_a_full_step():
    model = RetrofitLoop(hf_model("mistral"), (1, 3)).eval()
    x = tokens(batch=2)
    active = torch.zeros(2, 12, dtype=torch.bool)
    active[0, :5], active[1, :9] = True, True  # rows with different counts: padded pack
    with torch.no_grad():
        ctx = model.prepare(x)
        z1 = model.step(model.init_state(ctx), ctx, 0)
        full = model.step(z1, ctx, 1)
        part = model.step(z1, ctx, 1, active=active)
    torch.testing.assert_close(part[active], full[active], rtol=1e-5, atol=1e-5)
    assert torch.equal(part[~active], z1[~active])
    with pytest.raises(ValueError, match="previous full step"):
        fresh = model.prepare(x)
        model.step(model.init_state(fresh), fresh, 1, active=active)


def test_attention_capture_records_prelude_core_and_coda():
    model = RetrofitLoop(hf_model("mistral", attn="sdpa"), (1, 3)).eval()
    x = tokens(batch=2)
    with torch.no_grad():
        ctx = model.prepare(x, capture_attention=True)
        z = model.init_state(ctx)
        for k in range(2):
            z = model.step(z, ctx, k)
        model.readout(z, ctx)
    seen = [(e["loop"], e["layer"], e["kind"]) for e in ctx.attention]
    assert seen == [(-1, 0, "prelude"), (0, 0, "full"), (0, 1, "full"), (1, 0, "full"),
                    (1, 1, "full"), (-1, 0, "coda")]
    assert model.hf.config._attn_implementation == "sdpa"  # switched back after capture
    probs = ctx.attention[1]["probs"]
    assert probs.shape == (2, 4, 12, 12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 12))
    assert float(probs.triu(1).abs().max()) == 0.0  # causal
    assert float(probs.tril(-5).abs().max()) == 0.0  # mistral's 5-token sliding window


def test_unrolled_to_64_loops_and_classified(tmp_path):
    _, directory = saved("llama", tmp_path)
    model = build_model("hf", path=str(directory), loop_layers=(1, 3), injection="add")
    assert isinstance(model, RetrofitLoop)
    x = tokens(batch=3, seq=8)
    with torch.no_grad():
        ctx = model.prepare(x)
        states = [model.init_state(ctx)]
        for k in range(64):
            states.append(model.step(states[-1], ctx, k))
    states = torch.stack(states)
    assert states.shape == (65, 3, 8, 32) and bool(states.isfinite().all())

    def step_map(z, rows=None):
        return model.step(z, ctx if rows is None else ctx.select(rows), 64)

    verdicts = classify(states, f=step_map, spectral_iters=5, lyapunov_steps=4)
    assert len(verdicts.label) == 3
    assert set(verdicts.label) <= {"converged", "periodic", "quasi-periodic", "chaotic",
                                   "drifting", "diverging"}
    assert bool(verdicts.spectral_radius.isfinite().all())
    assert bool((verdicts.spectral_radius > 0).all())


def test_flops_and_halting_head():
    model = RetrofitLoop(hf_model("llama"), (0, 2)).eval()
    wider = RetrofitLoop(hf_model("llama"), (0, 4)).eval()
    assert wider.flops_per_token_step(16) == pytest.approx(2 * model.flops_per_token_step(16))
    assert model.flops_per_token_step(32) > model.flops_per_token_step(16)
    x = tokens()
    with torch.no_grad():
        ctx = model.prepare(x)
        logit = model.halt_logit(model.init_state(ctx), ctx)
    assert logit.shape == (3, 12)
    assert (model.vocab_size, model.d_model, model.halt_token_id) == (VOCAB, 32, None)


def test_per_loop_diagnostics_read_the_adapter():
    from experiments.evaluate.diagnostics import per_loop_table

    model = RetrofitLoop(hf_model("qwen3"), (1, 3), "add").eval()
    x = tokens(batch=2)
    with torch.no_grad():
        ctx = model.prepare(x, capture_attention=True)
        states, logits = [model.init_state(ctx)], []
        for k in range(4):
            states.append(model.step(states[-1], ctx, k))
            logits.append(model.readout(states[-1], ctx))
    table = per_loop_table(torch.stack(states), ctx.attention, torch.stack(logits))
    metrics = set(table["metric"])
    assert {"relative_residual", "attention_js", "logit_lens_kl", "effective_rank"} <= metrics
    js = table[table["metric"] == "attention_js"]
    assert js["loop"].tolist() == [2, 3, 4] and bool((js["value"] > 0).all())
