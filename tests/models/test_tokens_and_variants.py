"""Token-granularity steps (frozen K/V policy), PLT specifics, and DEQ contraction."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from _tiny import TINY, run_seeded

MASK = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 0, 1],
                     [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                     [1, 0, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)


def _after_loop0(model):
    ctx = model.prepare(TINY.tokens())
    torch.manual_seed(0)
    z = model.step(model.init_state(ctx), ctx, 0)
    return ctx, z


def _fork(ctx):
    """A context with its own cache dict (same tensors), so two runs do not interfere."""
    return replace(ctx, cache=dict(ctx.cache))


def test_all_active_equals_none(arch):
    model = TINY.model(arch)
    ctx, z = _after_loop0(model)
    full = model.step(z, _fork(ctx), 1)
    assert torch.equal(model.step(z, _fork(ctx), 1, active=torch.ones(3, 10, dtype=torch.bool)),
                       full)
    assert torch.equal(model.step(z, ctx, 1, active=torch.zeros(3, 10, dtype=torch.bool)), z)


def test_partial_mask_matches_dense_reference(arch):
    """Packed computation == the in-place reference (every position computed, inactive K/V and
    outputs replaced by the frozen ones)."""
    model = TINY.model(arch)
    ctx, z = _after_loop0(model)
    packed_ctx, dense_ctx = _fork(ctx), _fork(ctx)
    packed = model.step(z, packed_ctx, 1, active=MASK)
    model.pack_tokens = False
    dense = model.step(z, dense_ctx, 1, active=MASK)
    assert torch.equal(packed[~MASK], z[~MASK])  # inactive positions keep their state exactly
    assert not torch.allclose(packed[MASK], z[MASK])
    assert torch.allclose(packed, dense, atol=1e-5, rtol=0)
    for name in packed_ctx.cache:
        assert torch.allclose(packed_ctx.cache[name], dense_ctx.cache[name], atol=1e-5), name


def test_frozen_kv_from_the_same_state_equals_full_recompute(arch):
    """If the frozen K/V were computed from the same state at the same loop, a partial step must
    reproduce the full step at the active positions."""
    model = TINY.model(arch)
    ctx, z = _after_loop0(model)
    full = model.step(z, ctx, 1)  # caches loop-1 K/V of every position
    frozen_k = ctx.cache["own_k.0"]
    partial = model.step(z, ctx, 1, active=MASK)
    assert torch.allclose(partial[MASK], full[MASK], atol=1e-5, rtol=0)
    assert torch.allclose(ctx.cache["own_k.0"], frozen_k, atol=1e-5)


def test_partial_step_updates_only_active_kv(arch):
    model = TINY.model(arch)
    ctx, z = _after_loop0(model)
    before = ctx.cache["own_k.1"]
    model.step(z, ctx, 1, active=MASK)
    after = ctx.cache["own_k.1"]  # (B, H, T, hs)
    inactive = (~MASK)[:, None, :, None].expand_as(after)
    assert torch.equal(after[inactive], before[inactive])
    assert not torch.allclose(after[~inactive], before[~inactive])


def test_partial_step_computes_only_active_tokens(arch):
    model = TINY.model(arch)
    ctx, z = _after_loop0(model)
    widths = []
    hook = model.blocks[0].mlp.w1.register_forward_pre_hook(
        lambda module, args: widths.append(args[0].shape[:2]))
    model.step(z, ctx, 1, active=MASK)
    hook.remove()
    assert widths == [torch.Size([3, 6])]  # rows packed to the largest active count, not T=10


def test_partial_mask_needs_a_previous_full_step(arch):
    model = TINY.model(arch)
    ctx = model.prepare(TINY.tokens())
    z = model.init_state(ctx)
    with pytest.raises(ValueError, match="active"):
        model.step(z, ctx, 0, active=MASK)


# ----------------------------------------------------------------------------- parallel_loop
def test_clp_input_reads_previous_position_of_previous_loop():
    model = TINY.model("parallel_loop")
    ctx, z = _after_loop0(model)
    bump = torch.zeros_like(z)
    bump[:, 4] = 1.0
    base = model._loop_input(z, ctx.inject, ctx, 1, None)
    moved = model._loop_input(z + bump, ctx.inject, ctx, 1, None)
    changed = (moved - base).abs().amax(dim=(0, 2)) > 0  # (T,)
    assert changed.tolist() == [t == 5 for t in range(10)]
    assert torch.allclose(base[:, 0], model.config.clp_a * ctx.inject[:, 0])


def test_later_loops_never_write_the_loop1_cache():
    model = TINY.model("parallel_loop")
    ctx, z = _after_loop0(model)
    shared = {name: t for name, t in ctx.cache.items() if name.startswith("plt_")}
    copies = {name: t.clone() for name, t in shared.items()}
    assert len(shared) == 2 * model.config.n_layers
    z = model.step(z, ctx, 1)
    z = model.step(z, ctx, 2, active=MASK)
    model.step(z, ctx, 3)
    for name, tensor in shared.items():
        assert ctx.cache[name] is tensor and torch.equal(tensor, copies[name]), name


def test_later_loop_needs_loop0_cache():
    model = TINY.model("parallel_loop")
    ctx = model.prepare(TINY.tokens())
    with pytest.raises(ValueError, match="run step\\(z, ctx, 0\\)"):
        model.step(model.init_state(ctx), ctx, 1)


@pytest.mark.parametrize("variant", [dict(clp=False), dict(shared_kv=False),
                                     dict(gate_mode="query"), dict(gate_mode="fixed"),
                                     dict(window=1)])
def test_plt_variants_differ_and_stay_causal(variant):
    toks = TINY.tokens()
    reference = run_seeded(TINY.model("parallel_loop"), toks, 3)
    model = TINY.model("parallel_loop", **variant)
    logits = run_seeded(model, toks, 3)
    assert not torch.allclose(logits, reference, atol=1e-4)
    changed = toks.clone()
    changed[:, 7:] = (changed[:, 7:] + 3) % 32
    assert torch.allclose(run_seeded(model, changed, 3)[:, :7], logits[:, :7], atol=1e-6, rtol=0)


def test_plt_local_branch_stays_in_its_window():
    model = TINY.model("parallel_loop", window=3)
    ctx = model.prepare(TINY.tokens(), capture_attention=True)
    z = model.init_state(ctx)
    for k in range(2):
        z = model.step(z, ctx, k)
    kinds = {(e["loop"], e["kind"]) for e in ctx.attention}
    assert kinds == {(0, "full"), (1, "global"), (1, "local")}
    for entry in ctx.attention:
        if entry["kind"] == "local":
            outside = torch.ones(10, 10, dtype=torch.bool).tril(-3)  # j <= t - 3
            assert entry["probs"][..., outside].abs().max() == 0


# ----------------------------------------------------------------------------- deq
@pytest.mark.parametrize("injection", ["add", "concat"])
@pytest.mark.parametrize("deq_norm", ["spectral", "weight"])
def test_deq_residual_shrinks(injection, deq_norm):
    model = TINY.model("deq", injection=injection, deq_norm=deq_norm)
    ctx = model.prepare(TINY.tokens())
    z = model.init_state(ctx)
    residuals = []
    with torch.no_grad():
        for k in range(30):
            z_next = model.step(z, ctx, k)
            residuals.append(float((z_next - z).norm() / z_next.norm()))
            z = z_next
    assert residuals[-1] < 1e-4 * residuals[0]
    assert residuals[5] < residuals[1] < residuals[0]
    assert torch.allclose(model.step(z, ctx, 0), model.step(z, ctx, 17))  # same map at every k


def test_deq_training_mode_keeps_one_map_per_context():
    model = TINY.model("deq").train()
    ctx = model.prepare(TINY.tokens())
    z = torch.randn(3, 10, 32)
    assert torch.equal(model.step(z, ctx, 0), model.step(z, ctx, 5))
    assert torch.equal(copy.deepcopy(model).eval()(TINY.tokens(), loops=2),
                       model.eval()(TINY.tokens(), loops=2))
