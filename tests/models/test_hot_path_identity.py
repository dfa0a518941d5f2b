"""Shortcuts on the model's hot path must be bit-identical to the computation they replace.

Each test builds the reference (the code path before the shortcut) independently and compares
logits and gradients with ``torch.equal`` — not allclose: the study's results tables must not
change by a single bit for the same seed.
"""

from __future__ import annotations

import types

import pytest
import torch
from _tiny import TINY

from models.layers import Mixer


def _explicit_band_mixer(self, ctx, k: int, layer: int, pack) -> Mixer:
    """The gated mixer as written before the causal shortcut: always the explicit band mask."""
    gate = self.gates[layer] if self.gates is not None else None
    seq = ctx.tokens.shape[1]

    def gated(q, keys, values, h):
        k1, v1 = ctx.cache[f"plt_k.{layer}"], ctx.cache[f"plt_v.{layer}"]
        o_glob = self._attend(ctx, k, layer, "global", q, k1, v1, pack)
        keys, values = self._own_kv(ctx, layer, pack, keys, values)
        o_loc = self._attend(ctx, k, layer, "local", q, keys, values, pack,
                             window_mask=self.window_mask[:seq, :seq], window=self.config.window)
        g = gate(q, h) if gate is not None else 0.5
        return g * o_glob + (1 - g) * o_loc

    return gated


def _logits_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, 3)
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("gate_mode", ["hidden", "query", "fixed"])
def test_plt_local_branch_causal_shortcut_is_bit_identical(gate_mode):
    window = 4
    for seq in range(1, TINY.config["max_seq_len"] + 1):  # shorter, equal and longer than w
        fast = TINY.model("parallel_loop", window=window, gate_mode=gate_mode).train()
        slow = TINY.model("parallel_loop", window=window, gate_mode=gate_mode).train()
        slow._gated_mixer = types.MethodType(_explicit_band_mixer, slow)
        tokens = TINY.tokens(batch=5, seq=seq)
        got, got_grads = _logits_and_grads(fast, tokens)
        want, want_grads = _logits_and_grads(slow, tokens)
        assert torch.equal(got, want), f"logits differ at seq={seq}"
        assert len(got_grads) == len(want_grads) > 0
        for a, b in zip(got_grads, want_grads, strict=True):
            assert torch.equal(a, b), f"gradients differ at seq={seq}"


def test_plt_local_branch_still_local_when_sequence_outgrows_the_window():
    """The shortcut applies only while seq <= window: a longer sequence keeps its band."""
    model = TINY.model("parallel_loop", window=3)
    ctx = model.prepare(TINY.tokens(seq=10), capture_attention=True)
    z = model.init_state(ctx)
    for k in range(2):
        z = model.step(z, ctx, k)
    local = [e["probs"] for e in ctx.attention if e["kind"] == "local"]
    assert local
    outside = torch.ones(10, 10, dtype=torch.bool).tril(-3)
    assert all(p[..., outside].abs().max() == 0 for p in local)
