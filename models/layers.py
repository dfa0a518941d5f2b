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
  a (B, T_active_max, D) tensor and scatter the results back, so only active tokens are computed;
  indices and attention masks are built once per step and shared by every layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    """Rotary tables for positions ``0 .. max_seq_len-1`` (non-persistent buffers).

    Stored full width for ``x * cos + rotate_half(x) * sin``: ``cos`` = (cos, cos) and ``sin`` =
    (-sin, sin) over the two halves, so a rotation is two products and a sum.
    """

    def __init__(self, head_size: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        cos, sin = angles.cos().float(), angles.sin().float()  # (L, hs/2)
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)  # (L, hs)
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def tables(self, seq_len: int, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos/sin broadcastable to (B, T, n, H, hs) (``SelfAttention.project``'s layout): all
        positions, or the (B, Tq) ``positions``."""
        if positions is None:
            return self.cos[:seq_len, None, None], self.sin[:seq_len, None, None]  # (T,1,1,hs)
        cos, sin = self.cos[positions], self.sin[positions]  # (B, Tq, hs)
        return cos[:, :, None, None], sin[:, :, None, None]  # (B, Tq, 1, 1, hs)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the last dim of x by the position angles (half-split pairing): the first half
    becomes ``x1 cos - x2 sin``, the second ``x1 sin + x2 cos``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # (x2, x1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


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
        """(B, T, D) -> post-RoPE q, k and v, each (B, H, T, hs) (strided views); queries and
        keys are rotated together."""
        batch, seq, dim = h.shape
        qkv = self.qkv(h).view(batch, seq, 3, self.n_heads, dim // self.n_heads)
        qk = apply_rotary(qkv[:, :, :2], cos, sin)  # (B, T, 2, H, hs)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hs)
        return q, k, qkv[:, :, 2].transpose(1, 2)

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
        x = x + self._branch(self.attn.merge_heads(mixer(q, k, v, h)), scale)
        return x + self._branch(self.mlp(self.n2(x)), scale)

    def _branch(self, y: Tensor, scale: float) -> Tensor:
        y = F.dropout(y, self.dropout, self.training) if self.dropout > 0 else y
        return y if scale == 1.0 else scale * y  # no multiply by 1 on the hot path


class TokenPack:
    """Active positions of each row, packed to the front: ``pos`` (B, Ta), ``valid`` (B, Ta).

    Padding slots (``valid`` False) point at distinct inactive positions. Everything derived from
    the pack — flat row indices, attention masks — is built once per pack (once per step) and
    reused by every layer, with as few tensor ops as possible (at small sizes a token step costs
    per-op overhead as much as FLOPs). Gathers are ``index_select`` of rows; write-backs are one
    ``index_copy`` of the packed rows into a copy of the target (padding slots rewrite the entry
    they point at), so autograd sees ordinary out-of-place ops.
    """

    def __init__(self, pos: Tensor, valid: Tensor, *, padded: bool = True) -> None:
        """``padded=False`` promises every slot is valid (all rows have the same active count),
        which lets write-backs skip the padding merge."""
        self.pos = pos
        self.valid = valid
        self.padded = padded
        self._memo: dict[tuple[object, ...], Tensor] = {}

    @classmethod
    def from_mask(cls, active: Tensor, counts: tuple[int, int] | None = None) -> TokenPack:
        """Pack a (B, T) bool mask; ``counts`` = (fewest, most) active per row, if known."""
        per_row = active.sum(dim=1)  # (B,)
        if counts is None:
            counts = tuple(torch.stack(torch.aminmax(per_row)).tolist())
        fewest, most = counts
        # stable descending sort puts active positions first, in increasing position order
        order = torch.sort(active.to(torch.uint8), dim=1, descending=True, stable=True).indices
        pos = order[:, :most]  # (B, Ta)
        valid = torch.arange(most, device=active.device) < per_row.unsqueeze(1)  # (B, Ta)
        return cls(pos=pos, valid=valid, padded=fewest != most)

    @classmethod
    def dense(cls, active: Tensor) -> TokenPack:
        """Every position in place (no reordering): the reference layout for tests."""
        batch, seq = active.shape
        pos = torch.arange(seq, device=active.device).expand(batch, seq)
        return cls(pos=pos, valid=active)

    def _rows(self, seq_len: int, heads: int = 0) -> Tensor:
        """Flat index of the packed slots: (B*Ta,) into (B*T, ...) rows, or, with ``heads``,
        (B*H*Ta,) into the (B*H*T, hs) rows of a head-major tensor."""
        key = ("rows", seq_len, heads)
        if key not in self._memo:
            batch, device = self.pos.shape[0], self.pos.device
            if heads == 0:
                start = torch.arange(0, batch * seq_len, seq_len, device=device)
                rows = self.pos + start.unsqueeze(1)  # (B, Ta)
            else:
                start = torch.arange(0, batch * heads * seq_len, seq_len, device=device)
                rows = self.pos.unsqueeze(1) + start.view(batch, heads, 1)  # (B, H, Ta)
            self._memo[key] = rows.reshape(-1)
        return self._memo[key]

    def _valid_rows(self, heads: int = 0) -> Tensor:
        """``valid`` as a column matching ``_rows(seq_len, heads)``: (B*Ta, 1) or (B*H*Ta, 1)."""
        key = ("valid", heads)
        if key not in self._memo:
            valid = self.valid if heads == 0 else self.valid.unsqueeze(1).expand(-1, heads, -1)
            self._memo[key] = valid.reshape(-1, 1)
        return self._memo[key]

    def gather(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (B, Ta, ...) at the packed positions."""
        batch, seq = x.shape[:2]
        rows = x.reshape(batch * seq, -1).index_select(0, self._rows(seq))  # (B*Ta, prod(...))
        return rows.view(*self.pos.shape, *x.shape[2:])

    def scatter(self, full: Tensor, packed: Tensor) -> Tensor:
        """``full`` (B, T, ...) with the valid packed rows written back (a new tensor)."""
        seq = full.shape[1]
        return self._write(full, packed.reshape(self.pos.numel(), -1), self._rows(seq), 0)

    def scatter_heads(self, full: Tensor, packed: Tensor) -> Tensor:
        """Like ``scatter`` for head-major (B, H, T, hs) tensors (the per-layer K/V caches)."""
        _, heads, seq, size = full.shape
        return self._write(full, packed.reshape(-1, size), self._rows(seq, heads), heads)

    def _write(self, full: Tensor, rows: Tensor, dest: Tensor, heads: int) -> Tensor:
        flat = full.reshape(-1, rows.shape[1])  # (N, C)
        rows = rows.to(full.dtype)
        if self.padded:  # padding slots rewrite the (inactive) entries they point at
            rows = torch.where(self._valid_rows(heads), rows, flat.index_select(0, dest))
        return flat.index_copy(0, dest, rows).view(full.shape)

    def key_mask(self, seq_len: int, window: int | None = None) -> Tensor:
        """(B, 1, Ta, T) bool: key j visible to packed query at position p iff j <= p
        (and p - j < window when given). Built once per pack and window."""
        if window is not None and window >= seq_len:
            window = None  # p - j <= T - 1 < window always holds
        key = ("mask", seq_len, window)
        if key not in self._memo:
            keys = torch.arange(seq_len, device=self.pos.device)
            offset = self.pos.unsqueeze(-1) - keys  # (B, Ta, T)
            mask = offset >= 0
            if window is not None:
                mask = mask & (offset < window)
            self._memo[key] = mask.unsqueeze(1)  # (B, 1, Ta, T)
        return self._memo[key]

    def additive_mask(self, seq_len: int, window: int | None, dtype: torch.dtype) -> Tensor:
        """``key_mask`` as 0 / -inf in ``dtype``, what the fused kernel adds to the scores."""
        if window is not None and window >= seq_len:
            window = None
        key = ("additive", seq_len, window, dtype)
        if key not in self._memo:
            mask = self.key_mask(seq_len, window)
            zero = torch.zeros((), dtype=dtype, device=mask.device)
            self._memo[key] = torch.where(mask, zero, float("-inf"))
        return self._memo[key]
