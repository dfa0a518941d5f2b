"""Example task (not shipped): reverse a bit string. ``b_1 .. b_n =`` followed by n slots whose
targets are ``b_n .. b_1``; difficulty = n, ``hard`` = longer strings. One file: the class and its
registration."""

from __future__ import annotations

import torch

from experiments.tasks import IGNORE, TASKS, Batch, GeneratedTask


@TASKS.register("reverse")
class ReverseTask(GeneratedTask):
    """Tokens: 0 pad, 1 halt, 2/3 bits, 4 ``=``, 5 answer slot."""

    PAD, HALT, BIT0, EQ, SLOT = 0, 1, 2, 4, 5

    def __init__(self, min_len: int = 2, max_len: int = 5, val_fraction: float = 0.2) -> None:
        self.name, self.vocab_size, self.pad_id, self.halt_token_id = "reverse", 6, 0, 1
        if not 1 <= min_len <= max_len:
            raise ValueError(f"task 'reverse': need 1 <= min_len <= max_len, got "
                             f"{min_len}, {max_len}")
        self.train_range, self.hard_range = (min_len, max_len), (max_len + 1, 2 * max_len)
        self._set_val_fraction(val_fraction)
        self.seq_len = 2 * self.hard_range[1] + 1

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        lengths = torch.randint(low, high + 1, (n,), generator=generator)
        bits = torch.randint(0, 2, (n, high), generator=generator)
        width = 2 * high + 1
        tokens = torch.full((n, width), self.PAD)
        targets = torch.full((n, width), IGNORE)
        for row in range(n):  # small n and lengths: clarity over vectorisation
            m = int(lengths[row])
            tokens[row, :m] = bits[row, :m] + self.BIT0
            tokens[row, m] = self.EQ
            tokens[row, m + 1: 2 * m + 1] = self.SLOT
            targets[row, m + 1: 2 * m + 1] = bits[row, :m].flip(0) + self.BIT0
        return Batch(tokens, targets, lengths)
