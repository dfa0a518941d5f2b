"""The ``s5`` task.

A sequence of permutations of 5 elements (120 tokens); the target at every position is the
running composition (state tracking; Liu et al. 2023 "Transformers learn shortcuts to automata";
Merrill et al. 2024 "The illusion of state"); difficulty = length; ``degree=3`` gives the
smaller non-abelian group S3.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from experiments.tasks.base import (
    IGNORE,
    TASKS,
    Batch,
    GeneratedTask,
    _lengths,
    _ranges,
    _targets_mode,
)


def _perm_tables(degree: int = 5) -> tuple[list[tuple[int, ...]], Tensor]:
    """Permutations of ``degree`` (lexicographic); ``compose[i, j]`` = index of perm_i o perm_j."""
    perms = list(itertools.permutations(range(degree)))
    index = {p: i for i, p in enumerate(perms)}
    compose = torch.tensor(
        [[index[tuple(p[q[x]] for x in range(degree))] for q in perms] for p in perms]
    )
    return perms, compose  # (degree!, degree!)


@TASKS.register("s5")
class S5Task(GeneratedTask):
    """Compose permutations of 5 elements; the target at position t is g_t o ... o g_1.

    Tokens: 0 pad, 1 halt, 2..121 the 120 permutations (lexicographic order); targets use the same
    ids. ``targets="all"`` supervises every position, ``"last"`` only the final one.
    Difficulty = length. ``degree`` (2..6) swaps in S_degree (degree! tokens); S3 is a much
    easier non-abelian group for small models.
    """

    PAD, HALT, PERM0 = 0, 1, 2

    def __init__(self, min_len: int = 2, max_len: int = 8, hard_min_len: int | None = None,
                 hard_max_len: int | None = None, targets: str = "all", degree: int = 5,
                 val_fraction: float = 0.1) -> None:
        if degree not in range(2, 7):
            raise ValueError(f"task 's5': degree must be an integer in 2..6, got {degree!r}")
        self.compose = _perm_tables(degree)[1]
        self.n_perms = self.compose.shape[0]
        self.name, self.pad_id, self.halt_token_id = "s5", 0, 1
        self.vocab_size = self.PERM0 + self.n_perms
        self.train_range, self.hard_range = _ranges(
            self.name, "len", (min_len, max_len, hard_min_len, hard_max_len))
        self.targets_mode = _targets_mode(self.name, targets)
        self._set_val_fraction(val_fraction)
        self.seq_len = self.hard_range[1]

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        lengths = _lengths(n, low, high, generator)  # (n,)
        perms = torch.randint(0, self.n_perms, (n, high), generator=generator)  # (n, high)
        inside = torch.arange(high)[None, :] < lengths[:, None]
        state = perms[:, 0]
        running = [state]
        for t in range(1, high):
            state = self.compose[perms[:, t], state]  # g_t o state
            running.append(state)
        running_t = torch.stack(running, dim=1)  # (n, high)
        tokens = torch.where(inside, perms + self.PERM0, self.PAD)
        targets = torch.where(inside, running_t + self.PERM0, IGNORE)
        if self.targets_mode == "last":
            last = torch.arange(high)[None, :] == (lengths[:, None] - 1)
            targets = torch.where(last, targets, IGNORE)
        return Batch(tokens, targets, lengths)
