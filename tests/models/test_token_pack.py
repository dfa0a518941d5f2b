"""``TokenPack`` (token-granularity packing) against plain-indexing references, and backprop
through partial steps (the write-backs must stay autograd-safe)."""

from __future__ import annotations

import pytest
import torch
from _tiny import TINY

from models.layers import TokenPack

UNEVEN = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 0, 1],
                       [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                       [1, 0, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
EVEN = torch.tensor([[1, 0, 0, 1, 0, 1, 0, 0, 0, 0],
                     [0, 1, 1, 0, 0, 0, 0, 0, 0, 1],
                     [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)


def _reference_scatter(full, packed, active):
    """Write row b's packed rows, in order, to its active positions (a Python loop)."""
    out = full.clone()
    for b in range(full.shape[0]):
        where = active[b].nonzero().squeeze(1)
        out[b, where] = packed[b, : where.numel()]
    return out


@pytest.mark.parametrize("active", [UNEVEN, EVEN], ids=["padded", "unpadded"])
def test_pack_gather_and_scatter_match_plain_indexing(active):
    pack = TokenPack.from_mask(active)
    counts = active.sum(1)
    assert pack.padded == bool(counts.min() != counts.max())
    assert pack.pos.shape == (3, int(counts.max()))
    full = torch.randn(3, 10, 5)
    gathered = pack.gather(full)
    for b in range(3):
        want = full[b, active[b]]
        assert torch.equal(gathered[b, : want.shape[0]], want)
    packed = torch.randn(*pack.pos.shape, 5)
    assert torch.equal(pack.scatter(full, packed), _reference_scatter(full, packed, active))
    heads = torch.randn(3, 2, 10, 4)  # (B, H, T, hs)
    packed_heads = torch.randn(3, 2, pack.pos.shape[1], 4)
    want = _reference_scatter(heads.transpose(1, 2), packed_heads.transpose(1, 2), active)
    got = pack.scatter_heads(heads, packed_heads)
    assert torch.equal(got, want.transpose(1, 2))
    assert torch.equal(heads, heads.clone())  # inputs untouched (write-backs are out of place)


def test_from_mask_with_known_counts_equals_computed():
    counts = UNEVEN.sum(1)
    known = TokenPack.from_mask(UNEVEN, (int(counts.min()), int(counts.max())))
    computed = TokenPack.from_mask(UNEVEN)
    assert torch.equal(known.pos, computed.pos) and torch.equal(known.valid, computed.valid)


def test_masks_are_built_once_and_agree():
    pack = TokenPack.from_mask(UNEVEN)
    boolean = pack.key_mask(10, 4)
    assert pack.key_mask(10, 4) is boolean  # memoised per step
    assert torch.equal(pack.key_mask(10, 10), pack.key_mask(10))  # window >= T is causal
    additive = pack.additive_mask(10, 4, torch.float32)
    assert additive.dtype == torch.float32 and additive.shape == boolean.shape
    assert torch.equal(additive == 0, boolean)
    assert bool(torch.isneginf(additive[~boolean]).all())
    offset = pack.pos[:, None, :, None] - torch.arange(10)  # (B, 1, Ta, T)
    assert torch.equal(boolean, (offset >= 0) & (offset < 4))


def _grads(model, active):
    """Parameter gradients of a loss after loop 0 and two partial steps (the second reads K/V
    the first wrote), and the gradient at loop 0's output."""
    model.zero_grad()
    ctx = model.prepare(TINY.tokens())
    torch.manual_seed(0)
    z0 = model.step(model.init_state(ctx), ctx, 0)
    z0.retain_grad()
    out = model.step(model.step(z0, ctx, 1, active=active), ctx, 2, active=active)
    (out.pow(2).mean() + model.halt_logit(out, ctx).mean()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, z0.grad


def test_partial_steps_backprop_like_the_dense_reference(arch):
    """Gradients through packed partial steps equal those of the in-place reference layout (every
    position computed, inactive outputs and K/V replaced by the frozen ones). Eval mode with grad
    enabled: deq's spectral norm takes a power-iteration step per train-mode ``prepare``."""
    model = TINY.model(arch)
    packed, packed_z = _grads(model, UNEVEN)
    model.pack_tokens = False
    dense, dense_z = _grads(model, UNEVEN)
    assert packed.keys() == dense.keys() and len(packed) > 0
    for name in packed:
        assert torch.allclose(packed[name], dense[name], atol=1e-5, rtol=1e-4), name
    assert torch.allclose(packed_z, dense_z, atol=1e-5, rtol=1e-4)
    assert packed_z[~UNEVEN].abs().sum() > 0  # inactive positions still pass gradient through
