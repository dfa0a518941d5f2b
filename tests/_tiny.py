"""The one tiny-model factory of the test suite (CPU, seeded, a few milliseconds per forward).

Two sizes of the same factory: ``TINY`` (the models tests: two layers, vocab 32, sequences of
10 in a max length of 16) and ``SMALL`` (the halting tests, which run many controllers: one layer,
vocab 16, T = 8). ``size.model("toy")`` is the plain ``LoopedModel`` of ``_toy.py`` at that size;
any other name is ``models.build_model``. A module of its own (not conftest) so that test
directories never fight over the name; pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from _toy import ToyLoop

from models import build_model
from models.base import LoopedModel


@dataclass(frozen=True)
class TinySize:
    """One size of tiny model: its ``ModelConfig`` fields and the default token batch shape."""

    config: dict[str, Any] = field(default_factory=dict)
    seq: int = 8
    batch: int = 3

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    def model(self, arch: str, seed: int = 0, **overrides: Any) -> LoopedModel:
        """A seeded model in eval mode; ``overrides`` replace config fields."""
        torch.manual_seed(seed)
        if arch == "toy":
            return ToyLoop(vocab_size=self.vocab_size, d_model=self.config["d_model"],
                           max_seq_len=self.config["max_seq_len"], **overrides).eval()
        return build_model(arch, **{**self.config, **overrides}).eval()

    def tokens(self, batch: int | None = None, seq: int | None = None,
               seed: int = 1) -> torch.Tensor:
        """(batch, seq) int64 token ids from a seeded generator (defaults: this size's)."""
        generator = torch.Generator().manual_seed(seed)
        shape = (self.batch if batch is None else batch, self.seq if seq is None else seq)
        return torch.randint(0, self.vocab_size, shape, generator=generator)


TINY = TinySize(dict(vocab_size=32, max_seq_len=16, d_model=32, n_heads=2, n_layers=2,
                     mlp_ratio=2, window=4, prelude_layers=1, coda_layers=1), seq=10)
SMALL = TinySize(dict(vocab_size=16, max_seq_len=8, d_model=32, n_heads=2, n_layers=1,
                      window=4), seq=8, batch=4)


def run_seeded(model: LoopedModel, tokens: torch.Tensor, loops: int,
               seed: int = 123) -> torch.Tensor:
    """``model(tokens, loops)`` with torch's global RNG seeded first (recurrent_depth draws its
    random initial state from it unless given a generator)."""
    torch.manual_seed(seed)
    return model(tokens, loops=loops)
