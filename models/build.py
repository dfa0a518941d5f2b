"""``build_model``: a ``LoopedModel`` from a ``ModelConfig``, a dict, or an arch name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# importing the architecture modules registers them in ARCH_REGISTRY
from models import deq, parallel_loop, recurrent_depth, serial_loop  # noqa: F401
from models.base import LoopedModel
from models.config import ModelConfig
from models.looped import ARCH_REGISTRY


def build_model(cfg_or_arch_name: ModelConfig | Mapping[str, Any] | str, **overrides: Any
                ) -> LoopedModel:
    """Build a looped model.

    Args:
        cfg_or_arch_name: a ``ModelConfig``, a mapping of its fields, or an architecture name
            (``parallel_loop``, ``serial_loop``, ``recurrent_depth``, ``deq``), or ``hf`` /
            ``hf_retrofit`` with ``path=`` a local transformers checkpoint directory plus
            ``models.hf.from_pretrained``'s arguments (``loop_layers``, ``injection``, ...).
        **overrides: ``ModelConfig`` fields replacing those of the first argument.

    Returns:
        The model, initialised (seed torch's RNG first for reproducible weights).

    Raises:
        KeyError: unknown architecture or config field (the message lists the known ones).
        ValueError: a field value out of range.
        TypeError: the first argument is none of the accepted types.

    Example:
        >>> model = build_model("parallel_loop", d_model=32, n_heads=2, window=8)
        >>> logits = model(tokens, loops=2)  # (B, T, vocab_size)
        >>> llama = build_model("hf", path="ckpt/llama-tiny", loop_layers=(1, 3))
    """
    hf_values = _hf_request(cfg_or_arch_name, overrides)
    if hf_values is not None:
        from models.hf import from_pretrained

        return from_pretrained(**hf_values)
    if isinstance(cfg_or_arch_name, ModelConfig):
        values = cfg_or_arch_name.to_dict()
    elif isinstance(cfg_or_arch_name, Mapping):
        values = dict(cfg_or_arch_name)
    elif isinstance(cfg_or_arch_name, str):
        ARCH_REGISTRY.get(cfg_or_arch_name)  # KeyError naming the known architectures
        values = {"arch": cfg_or_arch_name}
    else:
        raise TypeError(
            "build_model expects a ModelConfig, a dict or an architecture name, got "
            f"{type(cfg_or_arch_name).__name__}"
        )
    values.update(overrides)
    config = ModelConfig.from_dict(values)
    return ARCH_REGISTRY.get(config.arch)(config)


HF_ARCHS = ("hf", "hf_retrofit")


def _hf_request(first: object, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """The ``from_pretrained`` arguments when ``first`` names an HF adapter, else ``None``."""
    if isinstance(first, str) and first in HF_ARCHS:
        values = dict(overrides)
    elif isinstance(first, Mapping) and first.get("arch") in HF_ARCHS:
        values = {**first, **overrides}
        values.pop("arch")
    else:
        return None
    if not values.get("path"):
        raise ValueError("an hf model needs path= a local Hugging Face checkpoint directory")
    return values
