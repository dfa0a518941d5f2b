"""``CachedDecoding``: one-token decode steps over a ``DecodeCache``, shared by the architectures.

``halting.generate`` drives these; ``TransformerLoop`` inherits them and each architecture
overrides the hooks whose meaning it changes (what the new token injects, which buffer loop k's
keys/values live in, what the readout adds). The contract, for the new token of each row at
position t (``DecodePositions``):

- ``decode_inject(tokens, cache, at, rows)``: what every loop of the token reads from the input
  (embedding; Huginn's prelude, with its own cache; the DEQ's normed embedding).
- ``decode_step(z, inject, cache, k, at, rows)``: loop k of the token, (n, 1, D) -> (n, 1, D).
  Each layer writes the token's keys/values into loop k's buffer at t, then attends over the
  buffer's slots <= t. ``rows`` (running rows, original batch indices) lets a caller run a loop on
  the rows still running only; ``None`` means every row.
- ``decode_readout(z, cache, at, rows)``: logits (n, 1, V) of a state (Huginn's coda writes its
  cache; a later readout of the same position overwrites it, so the final readout wins).
- ``decode_freeze(cache, at, depth)``: the *frozen* policy of ``run_loop(granularity="token")``:
  a token that exited after ``depth`` loops shows every later loop its last computed keys/values,
  so loop k's buffer gets the exit loop's entry at t for every k >= depth.
- ``decode_remember(cache, states)``: what the next position reads of this one besides keys/values
  (PLT's CLP reads the previous position's state after each loop); default nothing.
- ``fill_decode_cache(cache, ctx, k, lengths)``: after a full-sequence prefill step k, copy the
  context's keys/values (frozen ones for halted tokens, as ``step`` keeps them) into loop k's
  buffer; ``fill_decode_plain`` copies prelude/coda keys/values after the prompt's readout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from models.base import LoopContext
from models.kv_cache import DecodeCache, DecodePositions, KVBuffer
from models.layers import Mixer, attend


class CachedDecoding:
    """Mixin of ``TransformerLoop``: see the module docstring. Needs ``config``, ``embed``,
    ``blocks``, ``rotary``, ``residual_scale``, ``_loop_input`` and ``_loop_output``."""

    config: Any
    embed: nn.Embedding
    blocks: nn.ModuleList

    # ----------------------------------------------------------------- the cache
    def new_decode_cache(self, batch: int, capacity: int, loops: int,
                         dtype: torch.dtype | None = None) -> DecodeCache:
        """Zeroed buffers for ``batch`` rows, ``capacity`` positions and ``loops`` loops."""
        cache = DecodeCache(capacity=capacity)
        self._add_decode_buffers(cache, batch, capacity, loops, dtype or self.embed.weight.dtype)
        return cache

    def _add_decode_buffers(self, cache: DecodeCache, batch: int, capacity: int, loops: int,
                            dtype: torch.dtype) -> None:
        """Default: one full buffer per (loop, layer) — R full caches."""
        self._add_buffer(cache, "loop", len(self.blocks), loops, batch, capacity, dtype)

    def _add_buffer(self, cache: DecodeCache, name: str, layers: int, groups: int, batch: int,
                    slots: int, dtype: torch.dtype, window: int | None = None) -> None:
        cfg = self.config
        cache.add(name, layers, groups, batch, cfg.n_heads, slots, cfg.d_model // cfg.n_heads,
                  dtype, self.embed.weight.device, window)

    def _decode_slot(self, k: int) -> tuple[str, int]:
        """(buffer group, index in it) holding loop k's keys/values."""
        return "loop", k

    # ----------------------------------------------------------------- one token
    def decode_inject(self, tokens: Tensor, cache: DecodeCache, at: DecodePositions,
                      rows: Tensor | None = None) -> Tensor:
        """(n, 1) ids -> (n, 1, D) what the loop reads from the input."""
        return self.embed(tokens)

    def decode_step(self, z: Tensor, inject: Tensor, cache: DecodeCache, k: int,
                    at: DecodePositions, rows: Tensor | None = None) -> Tensor:
        """Loop k of the new token: (n, 1, D) -> (n, 1, D); ``at`` covers the same n rows."""
        x = self._decode_input(z, inject, cache, k, at, rows)
        cos, sin = self._decode_rotary(at, 1)
        y = x
        for i, block in enumerate(self.blocks):
            y = block(y, cos, sin, self._decode_mixer(cache, k, i, at, rows), self.residual_scale)
        return self._loop_output(x, y, inject, k)

    def _decode_rotary(self, at: DecodePositions, queries: int) -> tuple[Tensor, Tensor]:
        """Rotary tables for ``queries`` query rows per row, all at the row's position."""
        if at.low == at.high:  # every row at one position: a slice, broadcast over rows
            cos, sin = self.rotary.tables(at.low + 1)  # (T, 1, 1, hs)
            return cos[at.low:], sin[at.low:]
        return self.rotary.tables(0, at.pos.view(-1, 1).expand(-1, queries))

    def _decode_input(self, z: Tensor, inject: Tensor, cache: DecodeCache, k: int,
                      at: DecodePositions, rows: Tensor | None) -> Tensor:
        return self._loop_input(z, inject, None, k, None)

    def _decode_mixer(self, cache: DecodeCache, k: int, layer: int, at: DecodePositions,
                      rows: Tensor | None) -> Mixer:
        name, group = self._decode_slot(k)
        return self._cached_attention(cache.buffers[name][layer], group, at, rows)

    def _cached_attention(self, buf: KVBuffer, group: int, at: DecodePositions,
                          rows: Tensor | None) -> Mixer:
        """Write the new keys/values into ``buf`` at ``at``, attend over its readable slots."""

        def mix(q: Tensor, keys: Tensor, values: Tensor, h: Tensor) -> Tensor:
            buf.store(group, rows, at, keys, values)
            cached_k, cached_v = buf.read(group, rows, at)
            return self._attend_cached(q, cached_k, cached_v, at.mask(buf.width(at)))

        return mix

    def _attend_cached(self, q: Tensor, keys: Tensor, values: Tensor,
                       mask: Tensor | None) -> Tensor:
        if keys.dtype != q.dtype:  # a cache kept in another dtype than autocast's
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return attend(q, keys, values, mask=mask, use_math=self.config.attention == "math")

    def _decode_plain(self, blocks: nn.ModuleList, name: str, x: Tensor, cache: DecodeCache,
                      at: DecodePositions, rows: Tensor | None) -> Tensor:
        """Blocks outside the loop (prelude/coda) on the new token, with their own cache."""
        cos, sin = self._decode_rotary(at, 1)
        for i, block in enumerate(blocks):
            x = block(x, cos, sin, self._cached_attention(cache.buffers[name][i], 0, at, rows))
        return x

    def decode_readout(self, z: Tensor, cache: DecodeCache, at: DecodePositions,
                       rows: Tensor | None = None) -> Tensor:
        """(n, 1, D) -> logits (n, 1, V)."""
        return self.readout(z, None)

    # ----------------------------------------------------------------- after a token
    def decode_freeze(self, cache: DecodeCache, at: DecodePositions, depth: Tensor,
                      loops: int, same_exit: int | None = None) -> None:
        """Frozen policy: loop k >= depth[b] shows loop depth[b]-1's keys/values at t (all rows).

        ``same_exit``: every row exited after this many loops (known on the host), which with
        one position for all rows is a plain slice copy per buffer."""
        if same_exit is not None and at.low == at.high:
            if same_exit < loops:
                self._freeze_slices(cache, at.low, same_exit, loops)
            return
        later = torch.arange(loops, device=depth.device).unsqueeze(0) >= depth.unsqueeze(1)
        rows, targets = later.nonzero(as_tuple=True)  # (row, loop) pairs the row never ran
        if rows.numel() == 0:
            return
        self._copy_loops(cache, rows, at.pos[rows], targets, depth[rows] - 1)

    def _copy_loops(self, cache: DecodeCache, rows: Tensor, pos: Tensor, targets: Tensor,
                    sources: Tensor) -> None:
        for buf in cache.buffers["loop"]:
            buf.copy_slot(targets, sources, rows, pos)

    def _freeze_slices(self, cache: DecodeCache, pos: int, depth: int, loops: int) -> None:
        for buf in cache.buffers["loop"]:
            buf.keys[depth:loops, :, :, pos] = buf.keys[depth - 1, :, :, pos]
            buf.values[depth:loops, :, :, pos] = buf.values[depth - 1, :, :, pos]

    def decode_remember(self, cache: DecodeCache, states: Tensor) -> None:
        """``states`` (R, B, 1, D): each row's state after 1..R loops (frozen past its exit)."""

    # ----------------------------------------------------------------- from a prefill
    def fill_decode_cache(self, cache: DecodeCache, ctx: LoopContext, k: int,
                          lengths: Tensor) -> None:
        """Copy the keys/values ``step(.., k)`` left in ``ctx.cache`` into loop k's buffers."""
        name, group = self._decode_slot(k)
        for i, buf in enumerate(cache.buffers[name]):
            fill_buffer(buf, group, ctx.cache[f"own_k.{i}"], ctx.cache[f"own_v.{i}"], lengths)

    def fill_decode_plain(self, cache: DecodeCache, ctx: LoopContext, lengths: Tensor) -> None:
        """Copy the prelude/coda keys/values a ``prepare(keep_kv=True)`` context kept."""
        for (name, layer), (keys, values) in ctx.extras.get("plain_kv", {}).items():
            fill_buffer(cache.buffers[name][layer], 0, keys, values, lengths)


def fill_buffer(buf: KVBuffer, group: int, keys: Tensor, values: Tensor, lengths: Tensor) -> None:
    """Write a prompt's keys/values (B, H, T, hs) into ``buf``: slots 0..T-1 of a full buffer;
    for a window ring of w slots, slot s gets each row's latest position p < length with
    p = s (mod w) (positions at or past a row's length are padding and never stored)."""
    seq = keys.shape[2]
    if buf.window is None:
        buf.keys[group, :, :, :seq] = keys.to(buf.keys.dtype)
        buf.values[group, :, :, :seq] = values.to(buf.values.dtype)
        return
    slots = torch.arange(buf.window, device=keys.device)
    last = (lengths.to(keys.device) - 1).unsqueeze(1)  # (B, 1)
    source = (last - (last - slots) % buf.window).clamp(min=0)  # (B, w); < 0 -> unreadable slot
    index = source[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
    buf.keys[group] = keys.gather(2, index).to(buf.keys.dtype)
    buf.values[group] = values.gather(2, index).to(buf.values.dtype)
