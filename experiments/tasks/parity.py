"""The ``parity`` task.

Bits, then ``=``; the target at ``=`` is the parity (difficulty = length); with
``targets="all"`` every bit also gets its prefix parity. Parity is the standard ACT / PonderNet
halting benchmark (Graves 2016; Banino et al. 2021). Its space is small (508 strings of length
2..8), so ``val`` strings are exactly the ones training never shows: memorising fails there.
"""

from __future__ import annotations

import torch

from experiments.tasks.base import (
    IGNORE,
    TASKS,
    Batch,
    GeneratedTask,
    _lengths,
    _ranges,
    _targets_mode,
)


@TASKS.register("parity")
class ParityTask(GeneratedTask):
    """Parity of a bit string: ``b_1 .. b_n =`` -> target at ``=`` is ``b_1 xor .. xor b_n``.

    Tokens: 0 pad, 1 halt, 2/3 bits 0/1, 4 ``=``. Difficulty = n. ``targets="all"`` also
    supervises every bit position with the parity of the prefix so far (denser signal).
    """

    PAD, HALT, ZERO, ONE, EQ = 0, 1, 2, 3, 4

    def __init__(self, min_len: int = 2, max_len: int = 8, hard_min_len: int | None = None,
                 hard_max_len: int | None = None, targets: str = "last",
                 val_fraction: float = 0.1) -> None:
        self.name, self.vocab_size, self.pad_id, self.halt_token_id = "parity", 5, 0, 1
        self.train_range, self.hard_range = _ranges(
            self.name, "len", (min_len, max_len, hard_min_len, hard_max_len))
        self.targets_mode = _targets_mode(self.name, targets)
        self._set_val_fraction(val_fraction)
        self.seq_len = self.hard_range[1] + 1

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        lengths = _lengths(n, low, high, generator)  # (n,)
        bits = torch.randint(0, 2, (n, high), generator=generator)  # (n, high)
        pos = torch.arange(high + 1)
        inside = pos[:high] < lengths[:, None]  # (n, high)
        bits = bits * inside
        tokens = torch.full((n, high + 1), self.PAD)
        tokens[:, :high] = torch.where(inside, bits + self.ZERO, self.PAD)
        rows = torch.arange(n)
        tokens[rows, lengths] = self.EQ
        targets = torch.full_like(tokens, IGNORE)
        if self.targets_mode == "all":
            prefix = torch.where(inside, bits.cumsum(dim=1) % 2 + self.ZERO, IGNORE)
            targets[:, :high] = prefix
        targets[rows, lengths] = bits.sum(dim=1) % 2 + self.ZERO
        return Batch(tokens, targets, lengths)
