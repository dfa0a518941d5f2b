"""Tiny models for the halting tests: the four real architectures (``models.build_model``) and the
toy of ``_toy.py``. Sizes per the brief: d_model 32, 1 layer, vocab 16, T 8."""

from __future__ import annotations

import pytest
import torch
from _toy import ToyLoop

from models import ARCHS
from models.base import LoopedModel

VOCAB, SEQ, D_MODEL = 16, 8, 32
ALL_ARCHS = ("toy", *ARCHS)


def make_model(arch: str, seed: int = 0, **overrides: object) -> LoopedModel:
    """A seeded tiny model in eval mode; real architectures skip if ``build_model`` is missing."""
    torch.manual_seed(seed)
    if arch == "toy":
        return ToyLoop(vocab_size=VOCAB, d_model=D_MODEL, max_seq_len=SEQ, **overrides).eval()
    try:
        from models import build_model
    except ImportError:
        pytest.skip("models.build_model is not available yet")
    settings = dict(d_model=D_MODEL, n_layers=1, n_heads=2, vocab_size=VOCAB, max_seq_len=SEQ)
    if arch == "parallel_loop":
        settings["window"] = 4  # < T, so the local branch's window matters
    settings.update(overrides)
    return build_model(arch, **settings).eval()


def make_tokens(batch: int = 4, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
