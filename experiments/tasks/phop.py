"""The ``phop`` task.

p-hop induction over explicit pointers (Sanford, Hsu & Telgarsky 2024, "Transformers, parallel
computation and logarithmic depth"): the context lists pairs ``a b`` meaning a -> b (a random
permutation of m symbols), then ``SEP s`` and p ``HOP`` tokens; the target at the j-th ``HOP``
is f^j(s), so position j needs j chained look-ups (difficulty = p).
"""

from __future__ import annotations

import torch

from experiments.tasks.base import (
    IGNORE,
    TASKS,
    Batch,
    GeneratedTask,
    _int_range,
    _lengths,
    _ranges,
)


@TASKS.register("phop")
class PHopTask(GeneratedTask):
    """p-hop induction: pairs ``a b`` (a -> b, a random permutation of ``n_pairs`` symbols), then
    ``SEP s HOP^p``; the target at the j-th ``HOP`` is f^j(s).

    Tokens: 0 pad, 1 halt, 2 SEP, 3 HOP, 4.. symbols. Difficulty = p (hops); ``hard`` uses more
    hops than training, hence longer inputs.
    """

    PAD, HALT, SEP, HOP, SYM0 = 0, 1, 2, 3, 4

    def __init__(self, min_hops: int = 1, max_hops: int = 4, hard_min_hops: int | None = None,
                 hard_max_hops: int | None = None, n_pairs: int = 8, n_symbols: int = 16,
                 val_fraction: float = 0.1) -> None:
        self.name, self.pad_id, self.halt_token_id = "phop", 0, 1
        self.train_range, self.hard_range = _ranges(
            self.name, "hops", (min_hops, max_hops, hard_min_hops, hard_max_hops))
        _int_range(self.name, "n_pairs", n_pairs, "n_symbols", n_symbols, 2)
        self.n_pairs, self.n_symbols = n_pairs, n_symbols
        self.vocab_size = self.SYM0 + n_symbols
        self._set_val_fraction(val_fraction)
        self.seq_len = 2 * n_pairs + 2 + self.hard_range[1]

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        m = self.n_pairs
        hops = _lengths(n, low, high, generator)  # (n,)
        symbols = torch.rand(n, self.n_symbols, generator=generator).argsort(dim=1)[:, :m]  # (n, m)
        image = torch.rand(n, m, generator=generator).argsort(dim=1)  # (n, m) a_i -> a_image[i]
        order = torch.rand(n, m, generator=generator).argsort(dim=1)  # listing order of pairs
        heads = symbols.gather(1, order)  # (n, m)
        tails = symbols.gather(1, image.gather(1, order))
        pairs = torch.stack([heads, tails], dim=2).reshape(n, 2 * m)  # (n, 2m) a b a b ...
        start = torch.randint(0, m, (n,), generator=generator)  # index into symbols
        width = 2 * m + 2 + high
        tokens = torch.full((n, width), self.PAD)
        targets = torch.full((n, width), IGNORE)
        tokens[:, : 2 * m] = pairs + self.SYM0
        tokens[:, 2 * m] = self.SEP
        tokens[:, 2 * m + 1] = symbols.gather(1, start[:, None]).squeeze(1) + self.SYM0
        current = start
        for j in range(high):
            current = image.gather(1, current[:, None]).squeeze(1)
            live = j < hops
            tokens[:, 2 * m + 2 + j] = torch.where(live, self.HOP, self.PAD)
            value = symbols.gather(1, current[:, None]).squeeze(1) + self.SYM0
            targets[:, 2 * m + 2 + j] = torch.where(live, value, IGNORE)
        return Batch(tokens, targets, hops)
