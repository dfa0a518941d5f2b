"""Building blocks shared by every looped architecture.

- ``RMSNorm`` (Zhang & Sennrich 2019), computed in fp32 and cast back (safe under bf16 autocast).
- Rotary position embeddings (Su et al. 2021, RoFormer), half-split variant as in GPT-NeoX/Llama;
  the cos/sin tables are buffers built once for ``max_seq_len`` and sliced, never rebuilt per step.
- ``attend``: scaled dot-product attention with two paths — the fused SDPA kernel (default) and an
  explicit softmax ("math") used for attention capture and forward-mode AD (pytorch#128971: forward
  AD fails through the fused CPU kernel).
- ``SelfAttention`` (projections only; the mixing of queries with keys/values is supplied by the
  architecture, so PLT's gated two-branch attention reuses the same block), ``MLP`` (SwiGLU,
  Shazeer 2020, or GELU), and the pre-norm ``Block`` (nanoGPT / Llama layout).
- Token packing helpers for token-granularity steps: gather the active positions of each row into
  a (B, T_active_max, D) tensor and scatter the results back, so only active tokens are computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# A mixer receives post-RoPE queries/keys/values (B, H, Tq, hs) and the normed block input
# (B, Tq, D) and returns the attention output (B, H, Tq, hs) before the output projection.
Mixer = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
# A recorder receives the attention probabilities (B, H, Tq, Tk) of one attention call.
Recorder = Callable[[Tensor], None]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; statistics in fp32, output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """Rotary tables for positions ``0 .. max_seq_len-1`` (non-persistent buffers)."""

    def __init__(self, head_size: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # (L, hs/2)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, seq_len: int, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos/sin broadcastable to (B, H, Tq, hs/2): all positions, or (B, Tq) ``positions``."""
        if positions is None:
            return self.cos[:seq_len], self.sin[:seq_len]  # (T, hs/2)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (B,1,Tq,hs/2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, hs) by the position angles (half-split pairing)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    use_math: bool = False,
    record: Recorder | None = None,
) -> Tensor:
    """Attention of q (B, H, Tq, hs) over k, v (B, H, Tk, hs).

    Args:
        mask: bool, True = may attend; broadcastable to (B, H, Tq, Tk). Takes precedence over
            ``causal``.
        causal: top-left aligned causal mask (only used with Tq == Tk and no ``mask``).
        use_math: explicit softmax path (forward-mode AD, capture); also used when ``record``.
        record: called with the probabilities (B, H, Tq, Tk) on the math path.
    """
    if not use_math and record is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None
        )
    scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.shape[-1]))  # (B,H,Tq,Tk)
    if mask is None and causal:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if record is not None:
        record(probs)
    return probs.to(v.dtype) @ v


class SelfAttention(nn.Module):
    """Query/key/value and output projections of multi-head attention (no mixing inside)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def project(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, D) -> post-RoPE q, k and v, each (B, H, T, hs)."""
        batch, seq, dim = h.shape
        qkv = self.qkv(h).view(batch, seq, 3, self.n_heads, dim // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hs)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def merge_heads(self, o: Tensor) -> Tensor:
        """(B, H, T, hs) -> output projection of (B, T, D)."""
        batch, heads, seq, size = o.shape
        return self.out(o.transpose(1, 2).reshape(batch, seq, heads * size))


class MLP(nn.Module):
    """SwiGLU (``w2(silu(w1 x) * w3 x)``) or GELU (``w2(gelu(w1 x))``) feed-forward."""

    def __init__(self, d_model: int, hidden: int, kind: str = "swiglu") -> None:
        super().__init__()
        self.kind = kind
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False) if kind == "swiglu" else None
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(n1 x)`` then ``+ mlp(n2 x)``; mixing is pluggable."""

    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int, mlp: str, dropout: float):
        super().__init__()
        self.n1 = RMSNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.n2 = RMSNorm(d_model)
        self.mlp = MLP(d_model, mlp_hidden, mlp)
        self.dropout = dropout

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mixer: Mixer, scale: float = 1.0
    ) -> Tensor:
        """``x + s*attn(n1 x)`` then ``+ s*mlp(n2 x)``; ``scale`` s < 1 makes the block more
        contractive (DEQ, REFERENCE.md §1 FPRM)."""
        h = self.n1(x)
        q, k, v = self.attn.project(h, cos, sin)
        x = x + scale * F.dropout(self.attn.merge_heads(mixer(q, k, v, h)), self.dropout,
                                  self.training)
        return x + scale * F.dropout(self.mlp(self.n2(x)), self.dropout, self.training)


@dataclass
class TokenPack:
    """Active positions of each row, packed to the front: ``pos`` (B, Ta), ``valid`` (B, Ta)."""

    pos: Tensor
    valid: Tensor

    @classmethod
    def from_mask(cls, active: Tensor) -> TokenPack:
        """Pack a (B, T) bool mask; padding slots point at distinct inactive positions."""
        counts = active.sum(dim=1)  # (B,)
        width = int(counts.max())
        # stable sort puts active positions first, in increasing position order
        order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices  # (B, T)
        pos = order[:, :width]  # (B, Ta)
        valid = torch.arange(width, device=active.device) < counts[:, None]  # (B, Ta)
        return cls(pos=pos, valid=valid)

    @classmethod
    def dense(cls, active: Tensor) -> TokenPack:
        """Every position in place (no reordering): the reference layout for tests."""
        batch, seq = active.shape
        pos = torch.arange(seq, device=active.device).expand(batch, seq)
        return cls(pos=pos, valid=active)

    def gather(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (B, Ta, ...) at the packed positions."""
        index = self.pos.view(*self.pos.shape, *([1] * (x.dim() - 2))).expand(
            -1, -1, *x.shape[2:]
        )
        return x.gather(1, index)

    def scatter(self, full: Tensor, packed: Tensor) -> Tensor:
        """``full`` (B, T, ...) with valid packed rows written back (out of place)."""
        valid = self.valid.view(*self.valid.shape, *([1] * (full.dim() - 2)))
        merged = torch.where(valid, packed.to(full.dtype), self.gather(full))
        index = self.pos.view(*self.pos.shape, *([1] * (full.dim() - 2))).expand_as(merged)
        return full.scatter(1, index, merged)

    def scatter_heads(self, full: Tensor, packed: Tensor) -> Tensor:
        """Like ``scatter`` for head-major (B, H, T, hs) tensors (the per-layer K/V caches)."""
        return self.scatter(full.transpose(1, 2), packed.transpose(1, 2)).transpose(1, 2)

    def key_mask(self, seq_len: int, window: int | None = None) -> Tensor:
        """(B, 1, Ta, T) bool: key j visible to packed query at position p iff j <= p
        (and p - j < window when given)."""
        keys = torch.arange(seq_len, device=self.pos.device)
        offset = self.pos[:, None, :, None] - keys  # (B, 1, Ta, T)
        mask = offset >= 0
        if window is not None:
            mask = mask & (offset < window)
        return mask
