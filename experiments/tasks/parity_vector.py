"""``parity_vector``: parity in the form of ACT (Graves 2016) and PonderNet (Banino et al. 2021).

The input is a vector of ``size`` entries, each 0, +1 or -1; ``n`` of them (the difficulty) are
non-zero, at random positions, each +1 or -1 with probability 1/2. The target is the parity of the
number of +1 entries (Graves: "1 if there was an odd number of ones and 0 otherwise"). PonderNet
reads it the same way and tests extrapolation by training on 1..48 non-zero entries of a 96-vector
and evaluating on 49..96; here the defaults are scaled down to a 16-vector, 1..8 in training and
9..16 in ``hard``, so a 2-core CPU trains it in minutes.

Token form (a causal token model): one token per entry, then ``=``; the answer is read at ``=``,
the last position, which in a causal model is the only one that has seen every entry — so the
per-sample halting readout (``pool: last``) sees the whole input too. There is no padding: every
row has exactly ``size + 1`` tokens, so "the last position" is the same for every row.

Splits: ``val`` has the same range of non-zero counts as ``train``; an input is in ``val`` exactly
when a content hash of its tokens falls below ``val_fraction`` (disjoint by construction);
``hard`` draws counts strictly above the training maximum (disjoint by difficulty).

Tokens: 0 pad, 1 halt (reserved, never an input), 2 entry 0, 3 entry +1, 4 entry -1, 5 ``=``,
6 even, 7 odd.
"""

from __future__ import annotations

import torch

from experiments.tasks.base import IGNORE, TASKS, Batch, GeneratedTask, _int_range, _lengths


@TASKS.register("parity_vector")
class ParityVectorTask(GeneratedTask):
    """Parity of the +1 count of a 0/±1 vector; difficulty = number of non-zero entries.

    Args:
        size: vector length (tokens per input, before ``=``).
        min_nonzero, max_nonzero: non-zero counts of ``train``/``val`` (uniform).
        hard_min_nonzero, hard_max_nonzero: counts of ``hard``; default ``max_nonzero+1 .. size``.
        val_fraction: share of the input space held out for ``val``.
    """

    PAD, HALT, ZERO, PLUS, MINUS, EQ, EVEN, ODD = range(8)

    def __init__(self, size: int = 16, min_nonzero: int = 1, max_nonzero: int = 8,
                 hard_min_nonzero: int | None = None, hard_max_nonzero: int | None = None,
                 val_fraction: float = 0.1) -> None:
        self.name, self.vocab_size, self.pad_id, self.halt_token_id = "parity_vector", 8, 0, 1
        _int_range(self.name, "min_nonzero", min_nonzero, "max_nonzero", max_nonzero, 1)
        _int_range(self.name, "max_nonzero", max_nonzero, "size", size, 1)
        hard_low = max_nonzero + 1 if hard_min_nonzero is None else hard_min_nonzero
        hard_high = size if hard_max_nonzero is None else hard_max_nonzero
        _int_range(self.name, "hard_min_nonzero", hard_low, "hard_max_nonzero", hard_high, 1)
        if hard_low <= max_nonzero:
            raise ValueError(f"task {self.name!r}: hard_min_nonzero={hard_low} must exceed "
                             f"max_nonzero={max_nonzero} (the hard split holds harder inputs)")
        if hard_high > size:
            raise ValueError(f"task {self.name!r}: hard_max_nonzero={hard_high} must be <= "
                             f"size={size} (a vector has at most size non-zero entries)")
        self.size = size
        self.train_range, self.hard_range = (min_nonzero, max_nonzero), (hard_low, hard_high)
        self._set_val_fraction(val_fraction)
        self.seq_len = size + 1

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        counts = _lengths(n, low, high, generator)  # (n,) non-zero entries per row
        # a random ranking of the positions; the `count` lowest-ranked positions are non-zero
        rank = torch.rand(n, self.size, generator=generator).argsort(dim=1).argsort(dim=1)
        nonzero = rank < counts[:, None]  # (n, size)
        plus = torch.randint(0, 2, (n, self.size), generator=generator).bool() & nonzero
        entries = torch.where(plus, self.PLUS, torch.where(nonzero, self.MINUS, self.ZERO))
        tokens = torch.cat([entries, torch.full((n, 1), self.EQ)], dim=1)  # (n, size + 1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = torch.where(plus.sum(dim=1) % 2 == 1, self.ODD, self.EVEN)
        return Batch(tokens, targets, counts)
