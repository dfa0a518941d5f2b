"""Tiny random-init transformers checkpoints for the ``models.hf`` tests (built in the test, saved
to a temporary directory; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from halting.base import LoopController, StepView

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not "
                                   "installed: pip install -e '.[hf]'")

VOCAB = 50
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def hf_config(family: str, n_layers: int = 4, attn: str = "eager") -> object:
    """A 4-layer d=32 config of ``family`` (Mistral with a 5-token sliding window)."""
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers,
                  num_attention_heads=4, max_position_embeddings=64)
    decoder = dict(intermediate_size=64, num_key_value_heads=2, **common)
    if family == "llama":
        cfg = transformers.LlamaConfig(**decoder)
    elif family == "mistral":
        cfg = transformers.MistralConfig(sliding_window=5, **decoder)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**decoder)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=8, **decoder)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=n_layers, n_head=4,
                                      n_positions=64, bos_token_id=0, eos_token_id=0)
    elif family == "hrm_text":
        cfg = transformers.HrmTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                                         max_position_embeddings=64, H_cycles=2, L_cycles=2)
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    return cfg


def hf_model(family: str, attn: str = "eager", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(hf_config(family, attn=attn)).eval()


def saved(family: str, directory: Path, attn: str = "eager") -> tuple[torch.nn.Module, Path]:
    """The HF model and the directory it was ``save_pretrained`` to."""
    model = hf_model(family, attn)
    model.save_pretrained(directory)
    return model, directory


def tokens(batch: int = 3, seq: int = 12, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


class ScriptedExit(LoopController):
    """Row (token) ``i`` stops after ``plan[i]`` loops: a (B,) or, per token, a (B, T) plan."""

    name = "scripted"
    granularities = ("sample", "token")

    def __init__(self, plan: Tensor) -> None:
        super().__init__()
        self.plan = plan

    def decide(self, view: StepView) -> Tensor:
        stop = self.plan[view.rows] == view.loops
        if view.granularity == "token" and stop.dim() == 1:
            stop = stop.unsqueeze(1).expand(-1, view.z.shape[1])
        return stop


def count_step_rows(model: torch.nn.Module) -> list[int]:
    """Wrap ``model.step`` so every call appends the number of rows it computed."""
    calls: list[int] = []
    original = model.step

    def counted(z: Tensor, ctx, k: int, active: Tensor | None = None) -> Tensor:
        calls.append(z.shape[0])
        return original(z, ctx, k, active=active)

    model.step = counted
    return calls
