"""Tiny models shared by the models tests (CPU, seeded, a few milliseconds per forward).

A module of its own (not conftest) so that test directories never fight over the name.
"""

from __future__ import annotations

import torch

from models import build_model

TINY = dict(vocab_size=32, max_seq_len=16, d_model=32, n_heads=2, n_layers=2, mlp_ratio=2,
            window=4, prelude_layers=1, coda_layers=1)


def tiny(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(arch, **{**TINY, **overrides}).eval()


def tokens(batch: int = 3, seq: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, seq),
                         generator=torch.Generator().manual_seed(seed))


def run(model, toks, loops: int, seed: int = 123):
    """forward with torch's RNG seeded (recurrent_depth draws its initial state from it)."""
    torch.manual_seed(seed)
    return model(toks, loops=loops)
