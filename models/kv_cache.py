"""Key/value caches for decoding one token at a time (``halting.generate``).

A ``DecodeCache`` holds, per named group and layer, one ``KVBuffer``: post-RoPE keys and values of
the positions decoded so far, shaped (G, B, H, C, hs) — G loops that share the layout (the loops
of ``serial_loop``, or PLT's loops r >= 2), B rows, H heads, C slots, head size hs.

- A *full* buffer has one slot per position (C = the decode capacity): position t lives in slot t.
- A *window* buffer (PLT's local branch, window w) is a ring of C = w slots: position t lives in
  slot t mod w. A query at position t may read slot s iff s <= t: every earlier position of a row
  has been written (prefill writes the prompt, decode appends without gaps), so slot s then holds
  the latest position p <= t with p = s (mod w), and t - p < w. Keys carry their rotation, so the
  order of slots does not matter to attention.

Rows are right-padded (see ``halting.generate``): row b's next position is its own length, so the
valid slots of a full buffer are 0 .. t_b and one boolean mask (B, 1, 1, C) serves both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class KVBuffer:
    """Keys/values (G, B, H, C, hs) of one layer for G loops; ``window`` = ring size or None."""

    keys: Tensor
    values: Tensor
    window: int | None = None

    def column(self, pos: Tensor) -> Tensor:
        """Slot of each position (n,)."""
        return pos if self.window is None else pos % self.window

    def store(self, group: int, rows: Tensor | None, at: DecodePositions, keys: Tensor,
              values: Tensor) -> None:
        """Store the new token's keys/values (n, H, 1, hs) of loop ``group`` at ``at.pos``."""
        if rows is None and at.low == at.high:  # one column for every row: a plain slice
            col = at.low if self.window is None else at.low % self.window
            self.keys[group, :, :, col] = keys[:, :, 0]
            self.values[group, :, :, col] = values[:, :, 0]
            return
        rows = torch.arange(at.pos.shape[0], device=at.pos.device) if rows is None else rows
        col = self.column(at.pos)
        self.keys[group][rows, :, col] = keys[:, :, 0].to(self.keys.dtype)  # (n, H, hs)
        self.values[group][rows, :, col] = values[:, :, 0].to(self.values.dtype)

    def width(self, at: DecodePositions) -> int:
        """Slots a query at ``at`` may read: 0..high of a full buffer; of a ring, all w once the
        farthest row has passed w-1 (before that, slots past ``high`` are still empty)."""
        return at.high + 1 if self.window is None else min(self.window, at.high + 1)

    def read(self, group: int, rows: Tensor | None, at: DecodePositions
             ) -> tuple[Tensor, Tensor]:
        """Keys/values (n, H, ``width(at)``, hs) of loop ``group`` (views when ``rows`` is
        None); pair them with ``at.mask(width)``."""
        width = self.width(at)
        keys, values = self.keys[group, :, :, :width], self.values[group, :, :, :width]
        if rows is None:
            return keys, values
        return keys[rows], values[rows]

    def copy_slot(self, target: Tensor, source: Tensor, rows: Tensor, pos: Tensor) -> None:
        """keys[target[i], rows[i], :, slot(pos[i])] = keys[source[i], ...] (the frozen fill)."""
        col = self.column(pos)
        self.keys[target, rows, :, col] = self.keys[source, rows, :, col]
        self.values[target, rows, :, col] = self.values[source, rows, :, col]

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


@dataclass
class DecodeCache:
    """Every buffer a decode step reads, plus per-architecture extras (PLT's last CLP states).

    Attributes:
        buffers: group name (``loop``, ``global``, ``local``, ``prelude``, ``coda``) -> one
            ``KVBuffer`` per layer.
        capacity: slots of every full buffer (the longest prompt plus the new tokens fed back).
        extras: batch-first tensors a step reads besides keys/values.
    """

    buffers: dict[str, list[KVBuffer]] = field(default_factory=dict)
    capacity: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, layers: int, groups: int, batch: int, heads: int, slots: int,
            head_size: int, dtype: torch.dtype, device: torch.device,
            window: int | None = None) -> None:
        """Allocate ``layers`` buffers of (groups, batch, heads, slots, head_size), zeroed."""
        shape = (groups, batch, heads, slots, head_size)
        self.buffers[name] = [
            KVBuffer(torch.zeros(shape, dtype=dtype, device=device),
                     torch.zeros(shape, dtype=dtype, device=device), window)
            for _ in range(layers)
        ]

    def nbytes(self) -> int:
        """Bytes held by every key/value buffer."""
        return sum(buf.nbytes for layers in self.buffers.values() for buf in layers)

    def layout(self) -> dict[str, dict[str, int | None]]:
        """Per group: ``layers``, ``loops`` (G), ``slots`` (C) and ``window`` — what a test or a
        user checks the memory promise against."""
        return {name: {"layers": len(layers), "loops": layers[0].keys.shape[0],
                       "slots": layers[0].keys.shape[3], "window": layers[0].window}
                for name, layers in self.buffers.items() if layers}


@dataclass
class DecodePositions:
    """Where the new token of each running row sits: ``pos`` (n,), with host-side bounds ``low``
    <= every pos <= ``high`` (kept on the host so building masks needs no synchronisation)."""

    pos: Tensor
    low: int
    high: int

    def select(self, rows: Tensor) -> DecodePositions:
        """The running subset ``rows``; the bounds stay valid bounds."""
        return DecodePositions(self.pos[rows], self.low, self.high)

    def mask(self, slots: int) -> Tensor | None:
        """(n, 1, 1, slots) bool: slot s readable iff s <= pos (module docstring); ``None`` when
        every slot read is valid for every row (the fused kernel's fast path)."""
        if self.low >= slots - 1:
            return None
        keys = torch.arange(slots, device=self.pos.device)
        return (keys <= self.pos.unsqueeze(1)).view(-1, 1, 1, slots)
