"""The ``addition`` task.

Two n-digit numbers, least significant digit first, then n+1 answer slots whose targets are the
sum's digits, also reversed (difficulty = n). Reversed-digit addition follows Lee et al. 2023,
"Teaching arithmetic to small transformers"; answers fill placeholder slots instead of teacher
forcing, so no answer digit is visible to the model.
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
)


@TASKS.register("addition")
class AdditionTask(GeneratedTask):
    """``a + b`` with n-digit operands, digits least significant first, answer in n+1 slots.

    Layout: ``a_0..a_{n-1} + b_0..b_{n-1} = ?_0..?_n``; the target at ``?_i`` is digit i of a+b.
    Tokens: 0 pad, 1 halt, 2..11 digits, 12 ``+``, 13 ``=``, 14 ``?``. Difficulty = n.
    """

    PAD, HALT, DIGIT0, PLUS, EQ, SLOT = 0, 1, 2, 12, 13, 14

    def __init__(self, min_digits: int = 1, max_digits: int = 4,
                 hard_min_digits: int | None = None, hard_max_digits: int | None = None,
                 val_fraction: float = 0.1) -> None:
        self.name, self.vocab_size, self.pad_id, self.halt_token_id = "addition", 15, 0, 1
        self.train_range, self.hard_range = _ranges(
            self.name, "digits", (min_digits, max_digits, hard_min_digits, hard_max_digits), 3)
        self._set_val_fraction(val_fraction)
        self.seq_len = 3 * self.hard_range[1] + 3

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        digits = _lengths(n, low, high, generator)  # (n,)
        a = torch.randint(0, 10, (n, high), generator=generator)  # (n, high) little-endian
        b = torch.randint(0, 10, (n, high), generator=generator)
        inside = torch.arange(high)[None, :] < digits[:, None]  # (n, high)
        a, b = a * inside, b * inside
        total = torch.zeros(n, high + 1, dtype=torch.long)  # digits of a + b, little-endian
        carry = torch.zeros(n, dtype=torch.long)
        for i in range(high):
            column = a[:, i] + b[:, i] + carry
            total[:, i], carry = column % 10, column // 10
        total[:, high] = carry  # columns past a row's own length add only its carry
        width = 3 * high + 3
        tokens = torch.full((n, width), self.PAD)
        targets = torch.full((n, width), IGNORE)
        rows = torch.arange(n)
        for i in range(high):
            live = i < digits  # (n,)
            tokens[rows[live], i] = a[live, i] + self.DIGIT0
            tokens[rows[live], digits[live] + 1 + i] = b[live, i] + self.DIGIT0
        tokens[rows, digits] = self.PLUS
        tokens[rows, 2 * digits + 1] = self.EQ
        for i in range(high + 1):
            live = i <= digits
            tokens[rows[live], 2 * digits[live] + 2 + i] = self.SLOT
            targets[rows[live], 2 * digits[live] + 2 + i] = total[live, i] + self.DIGIT0
        return Batch(tokens, targets, digits)
