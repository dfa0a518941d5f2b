"""Parallel Loop Transformer (PLT, arXiv 2510.24824; LoopCoder-v2, arXiv 2606.18023).

REFERENCE.md §1. The state z^(k) is the residual stream after the last block of loop k (before
the final norm, which ``readout`` applies); ``init_state`` is the token embeddings E, so loop 0
reads E.

- Loop 0 (the paper's loop 1): ordinary causal attention over the block stack; when ``shared_kv``
  it writes every layer's keys/values K1, V1 into ``ctx.cache`` (``plt_k.<i>``/``plt_v.<i>``, full
  batch). Later loops only read them.
- Cross-loop parallelism (``clp``): loop k >= 1 reads ``a*E_t + b*RMSNorm(z^(k-1))_{t-1}`` (zeros
  for the shifted part at t = 0); with ``clp=False`` it reads z^(k-1) itself (serial refinement).
- Gated sliding-window attention (``shared_kv``), per layer and head, loops k >= 1:
  ``o_glob = attn(q_t, K1_{<=t}, V1_{<=t})``, ``o_loc = attn(q_t, K^(k)_{t-w+1..t}, V^(k)_{...})``,
  ``g = sigmoid(W_g RMSNorm(x) + b)`` (``hidden``; RMSNorm(x) is the block's pre-attention norm),
  ``sigmoid(<w_h, q_t> + b_h)`` on the post-RoPE query (``query``) or 0.5 (``fixed``);
  ``o = o_proj(g*o_glob + (1-g)*o_loc)``. With ``shared_kv=False`` later loops use plain causal
  attention over their own keys/values.

Decoding (``models.decoding``): loop 0 writes the one full cache (``global``); loops k >= 1 keep
only their window (``local``, a ring of w slots each): one full cache plus (R-1) windows per
layer. ``decode_parallel`` runs all R loops of a new token as R query rows of one forward — with
CLP, loop k at t reads E_t, the previous position's state after k loops (kept by
``decode_remember``) and loop 0's keys/values, which row 0 writes in the same layer call before
any row attends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import LoopContext
from models.config import ModelConfig
from models.decoding import fill_buffer
from models.kv_cache import DecodeCache, DecodePositions, KVBuffer
from models.layers import Mixer, RMSNorm, TokenPack
from models.looped import ARCH_REGISTRY, TransformerLoop


class HeadGate(nn.Module):
    """Per-head mixing gate g in (0, 1) between the global and local branches."""

    def __init__(self, mode: str, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.mode = mode
        head_size = d_model // n_heads
        if mode == "hidden":
            self.proj = nn.Linear(d_model, n_heads)
        elif mode == "query":
            self.weight = nn.Parameter(torch.zeros(n_heads, head_size))
            self.bias = nn.Parameter(torch.zeros(n_heads))

    def forward(self, q: Tensor, h: Tensor) -> Tensor | float:
        """q (B, H, T, hs), h = RMSNorm(x) (B, T, D) -> g broadcastable to (B, H, T, hs)."""
        if self.mode == "hidden":
            return torch.sigmoid(self.proj(h)).transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
        if self.mode == "query":
            logit = torch.einsum("bhtd,hd->bht", q, self.weight.to(q.dtype))
            return torch.sigmoid(logit + self.bias[:, None].to(q.dtype)).unsqueeze(-1)
        return 0.5


@ARCH_REGISTRY.register("parallel_loop")
class ParallelLoop(TransformerLoop):
    """PLT: loop-1 KV shared with later loops, CLP input shift, gated sliding-window attention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        cfg = config
        self.clp_norm = RMSNorm(cfg.d_model) if cfg.clp else None
        gated = cfg.shared_kv and cfg.gate_mode != "fixed"
        self.gates = (
            nn.ModuleList(HeadGate(cfg.gate_mode, cfg.d_model, cfg.n_heads)
                          for _ in range(cfg.n_layers))
            if gated else None
        )
        band = self.causal_mask & ~self.causal_mask.tril(-cfg.window)  # t-w < j <= t
        self.register_buffer("window_mask", band, persistent=False)
        self.init_weights()

    @property
    def nilpotent_step(self) -> bool:
        # With CLP, loop k >= 1 at position t reads z^(k-1) only at t-1 (and E_t): the Jacobian
        # over positions is strictly lower-triangular.
        return bool(self.config.clp)

    def init_state(self, ctx: LoopContext, generator: torch.Generator | None = None) -> Tensor:
        """Deterministic: ``generator`` is accepted (the interface) and unused."""
        return ctx.inject

    def _loop_input(
        self, z: Tensor, inject: Tensor, ctx: LoopContext, k: int, pack: TokenPack | None
    ) -> Tensor:
        cfg = self.config
        if k == 0 or not cfg.clp:
            return z if pack is None else pack.gather(z)
        if pack is None:
            shifted = F.pad(self.clp_norm(z[:, :-1]), (0, 0, 1, 0))  # (B, T, D), row 0 = zeros
        else:
            prev = TokenPack((pack.pos - 1).clamp(min=0), pack.valid).gather(z)  # (B, Ta, D)
            shifted = self.clp_norm(prev) * (pack.pos > 0).unsqueeze(-1).to(prev.dtype)
        return cfg.clp_a * inject + cfg.clp_b * shifted

    def _loop_output(self, x: Tensor, y: Tensor, inject: Tensor, k: int) -> Tensor:
        return y

    def step(self, z: Tensor, ctx: LoopContext, k: int, active: Tensor | None = None) -> Tensor:
        if k == 0 and active is not None and not bool(active.all()):
            raise ValueError(
                "parallel_loop loop k=0 writes the loop-1 K/V cache and must run on every token "
                "(active=None or all True)"
            )
        if isinstance(k, int) and k >= 1 and self.config.shared_kv and "plt_k.0" not in ctx.cache:
            raise ValueError(
                f"parallel_loop step k={k} reads loop 0's K/V from ctx.cache; run step(z, ctx, 0) "
                "on the full batch first"
            )
        return super().step(z, ctx, k, active)

    def _mixer(self, ctx: LoopContext, k: int, layer: int, pack: TokenPack | None) -> Mixer:
        if k >= 1 and self.config.shared_kv:
            return self._gated_mixer(ctx, k, layer, pack)
        base = super()._mixer(ctx, k, layer, pack)
        if k > 0 or not self.config.shared_kv:
            return base

        def first_loop(q: Tensor, keys: Tensor, values: Tensor, h: Tensor) -> Tensor:
            ctx.cache[f"plt_k.{layer}"], ctx.cache[f"plt_v.{layer}"] = keys, values
            return base(q, keys, values, h)

        return first_loop

    def _gated_mixer(self, ctx: LoopContext, k: int, layer: int, pack: TokenPack | None) -> Mixer:
        gate = self.gates[layer] if self.gates is not None else None
        seq = ctx.tokens.shape[1]
        # a window at least as long as the sequence is the causal mask itself: then the fused
        # kernel's is_causal path (bit-identical, and cheaper than an explicit mask) is used
        band = self.window_mask[:seq, :seq] if seq > self.config.window else None

        def gated(q: Tensor, keys: Tensor, values: Tensor, h: Tensor) -> Tensor:
            k1, v1 = ctx.cache[f"plt_k.{layer}"], ctx.cache[f"plt_v.{layer}"]
            o_glob = self._attend(ctx, k, layer, "global", q, k1, v1, pack)
            keys, values = self._own_kv(ctx, layer, pack, keys, values)
            o_loc = self._attend(ctx, k, layer, "local", q, keys, values, pack,
                                 window_mask=band, window=self.config.window)
            g = gate(q, h) if gate is not None else 0.5
            return g * o_glob + (1 - g) * o_loc

        return gated

    def _keys_per_query(self, seq_len: int, k: int) -> float:
        causal = (seq_len + 1) / 2
        if k == 0 or not self.config.shared_kv:
            return causal
        w = min(self.config.window, seq_len)
        # local branch: min(t+1, w) keys at position t, averaged over t = 0..T-1
        local = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
        return causal + local

    def _extra_macs(self, k: int) -> float:
        if k == 0 or self.gates is None:
            return 0.0
        per_layer = self.config.d_model * self.config.n_heads if self.config.gate_mode == "hidden" \
            else self.config.d_model
        return per_layer * self.config.n_layers

    # -- decoding (models.decoding) -------------------------------------------------------------
    def _add_decode_buffers(self, cache: DecodeCache, batch: int, capacity: int, loops: int,
                            dtype: torch.dtype) -> None:
        if not self.config.shared_kv:
            super()._add_decode_buffers(cache, batch, capacity, loops, dtype)
            return
        layers = len(self.blocks)
        self._add_buffer(cache, "global", layers, 1, batch, capacity, dtype)
        if loops > 1:  # a ring no longer than the capacity behaves as a full buffer
            ring = min(self.config.window, capacity)
            self._add_buffer(cache, "local", layers, loops - 1, batch, ring, dtype, window=ring)

    def _decode_slot(self, k: int) -> tuple[str, int]:
        if not self.config.shared_kv:
            return "loop", k
        return ("global", 0) if k == 0 else ("local", k - 1)

    def _decode_input(self, z: Tensor, inject: Tensor, cache: DecodeCache, k: int,
                      at: DecodePositions, rows: Tensor | None) -> Tensor:
        if k == 0 or not self.config.clp:
            return z
        prev = cache.extras["clp_prev"][k - 1]  # (B, 1, D): previous position after k loops
        prev = prev if rows is None else prev[rows]
        return self._clp_mix(inject, prev, at)

    def _clp_mix(self, inject: Tensor, prev: Tensor, at: DecodePositions) -> Tensor:
        """a*E_t + b*RMSNorm(z_{t-1}), the shifted part zero at t = 0; prev (..., n, 1, D)."""
        shifted = self.clp_norm(prev)
        if at.low == 0:  # a row at position 0 has no previous position: zeros
            shifted = shifted * (at.pos > 0).view(-1, 1, 1).to(prev.dtype)
        return self.config.clp_a * inject + self.config.clp_b * shifted

    def decode_remember(self, cache: DecodeCache, states: Tensor) -> None:
        if self.config.clp:
            cache.extras["clp_prev"] = states

    def _decode_mixer(self, cache: DecodeCache, k: int, layer: int, at: DecodePositions,
                      rows: Tensor | None) -> Mixer:
        if k == 0 or not self.config.shared_kv:
            return super()._decode_mixer(cache, k, layer, at, rows)
        glob, local = cache.buffers["global"][layer], cache.buffers["local"][layer]
        gate = self.gates[layer] if self.gates is not None else None

        def gated(q: Tensor, keys: Tensor, values: Tensor, h: Tensor) -> Tensor:
            o_glob = self._attend_cached(q, *glob.read(0, rows, at), at.mask(glob.width(at)))
            local.store(k - 1, rows, at, keys, values)
            o_loc = self._attend_cached(q, *local.read(k - 1, rows, at),
                                        at.mask(local.width(at)))
            g = gate(q, h) if gate is not None else 0.5
            return g * o_glob + (1 - g) * o_loc

        return gated

    def _copy_loops(self, cache: DecodeCache, rows: Tensor, pos: Tensor, targets: Tensor,
                    sources: Tensor) -> None:
        if not self.config.shared_kv:
            super()._copy_loops(cache, rows, pos, targets, sources)
            return
        from_global = sources == 0  # exit after loop 0: its keys/values live in the global cache
        for glob, local in zip(cache.buffers["global"], cache.buffers["local"], strict=True):
            g_rows, g_pos = rows[from_global], pos[from_global]
            slot, col = targets[from_global] - 1, local.column(g_pos)
            local.keys[slot, g_rows, :, col] = glob.keys[0, g_rows, :, g_pos]
            local.values[slot, g_rows, :, col] = glob.values[0, g_rows, :, g_pos]
            rest = ~from_global
            local.copy_slot(targets[rest] - 1, sources[rest] - 1, rows[rest], pos[rest])

    def _freeze_slices(self, cache: DecodeCache, pos: int, depth: int, loops: int) -> None:
        if not self.config.shared_kv:
            super()._freeze_slices(cache, pos, depth, loops)
            return
        for glob, local in zip(cache.buffers["global"], cache.buffers["local"], strict=True):
            col = pos % local.window
            source = (glob, 0, pos) if depth == 1 else (local, depth - 2, col)
            buf, group, slot = source
            local.keys[depth - 1:loops - 1, :, :, col] = buf.keys[group, :, :, slot]
            local.values[depth - 1:loops - 1, :, :, col] = buf.values[group, :, :, slot]

    def fill_decode_cache(self, cache: DecodeCache, ctx: LoopContext, k: int,
                          lengths: Tensor) -> None:
        if k == 0 and self.config.shared_kv:
            for i, buf in enumerate(cache.buffers["global"]):
                fill_buffer(buf, 0, ctx.cache[f"plt_k.{i}"], ctx.cache[f"plt_v.{i}"], lengths)
            return
        super().fill_decode_cache(cache, ctx, k, lengths)

    @property
    def parallel_decode(self) -> bool:
        """Whether ``decode_parallel`` applies: CLP (loop k reads position t-1 only) and the
        shared loop-0 cache (the layout it is written for)."""
        return bool(self.config.clp and self.config.shared_kv)

    def decode_parallel(self, inject: Tensor, cache: DecodeCache, at: DecodePositions,
                        loops: int) -> Tensor:
        """All ``loops`` loops of the new token as rows of one forward: (B, 1, D) -> (R, B, 1, D)
        states after 1..R loops (every row of the batch)."""
        if not self.parallel_decode:
            raise ValueError("parallel decode needs parallel_loop with clp=True and "
                             f"shared_kv=True, got clp={self.config.clp}, "
                             f"shared_kv={self.config.shared_kv}")
        rows = [inject]  # loop 0 reads z^(0) = E
        if loops > 1:
            prev = cache.extras["clp_prev"][: loops - 1]  # (R-1, B, 1, D)
            rows.extend(self._clp_mix(inject, prev, at).unbind(0))
        x = torch.cat(rows, dim=1)  # (B, R, D): loop r is query row r
        cos, sin = self._decode_rotary(at, loops)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, self._parallel_mixer(cache, i, at, loops))
        return x.transpose(0, 1).unsqueeze(2)  # (R, B, 1, D)

    def _parallel_mixer(self, cache: DecodeCache, layer: int, at: DecodePositions,
                        loops: int) -> Mixer:
        glob = cache.buffers["global"][layer]
        local = cache.buffers["local"][layer] if loops > 1 else None
        gate = self.gates[layer] if self.gates is not None else None

        def parallel(q: Tensor, keys: Tensor, values: Tensor, h: Tensor) -> Tensor:
            glob.store(0, None, at, keys[:, :, :1], values[:, :, :1])  # loop 0 writes first
            o_glob = self._attend_cached(q, *glob.read(0, None, at), at.mask(glob.width(at)))
            if local is None:
                return o_glob
            o_loc = self._parallel_local(local, q, keys, values, at, loops)  # (B, H, R-1, hs)
            g = gate(q[:, :, 1:], h[:, 1:]) if gate is not None else 0.5
            mixed = torch.lerp(o_loc, o_glob[:, :, 1:], g)  # g*o_glob + (1-g)*o_loc, one op
            return torch.cat((o_glob[:, :, :1], mixed), dim=2)

        return parallel

    def _parallel_local(self, local: KVBuffer, q: Tensor, keys: Tensor, values: Tensor,
                        at: DecodePositions, loops: int) -> Tensor:
        """Loops 1..R-1 over their own windows, batched as (R-1)*B rows of one attention call
        (one local loop, R = 2: its query rows attend its ring directly, no regrouping)."""
        if loops == 2:
            local.store(0, None, at, keys[:, :, 1:], values[:, :, 1:])
            return self._attend_cached(q[:, :, 1:], *local.read(0, None, at),
                                       at.mask(local.width(at)))
        if at.low == at.high:  # one slot for every row: all loops' entries in one copy
            col = at.low % local.window
            local.keys[: loops - 1, :, :, col] = keys[:, :, 1:].permute(2, 0, 1, 3)
            local.values[: loops - 1, :, :, col] = values[:, :, 1:].permute(2, 0, 1, 3)
        else:
            for r in range(1, loops):
                local.store(r - 1, None, at, keys[:, :, r:r + 1], values[:, :, r:r + 1])
        batch, heads, _, size = q.shape
        width = local.width(at)
        ring_k = local.keys[..., :width, :].flatten(0, 1)  # ((R-1)B, H, width, hs)
        ring_v = local.values[..., :width, :].flatten(0, 1)
        q_loc = q[:, :, 1:].permute(2, 0, 1, 3).reshape((loops - 1) * batch, heads, 1, size)
        mask = at.mask(width)
        if mask is not None:
            mask = mask.repeat(loops - 1, 1, 1, 1)
        o_loc = self._attend_cached(q_loc, ring_k, ring_v, mask)  # ((R-1)B, H, 1, hs)
        return o_loc.view(loops - 1, batch, heads, size).permute(1, 2, 0, 3)

