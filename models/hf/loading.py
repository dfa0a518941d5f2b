"""Loading and saving adapted transformers checkpoints — local directories only, never the hub.

A loopscope-adapted directory is an ordinary ``save_pretrained`` directory plus two files:
``loopscope_hf.json`` (the adapter settings: loop layers, injection, attention implementation) and
``loopscope_adapter.safetensors`` (the adapter's own weights: the concat adapter and the halting
head). ``from_pretrained`` reads them when present, so a saved adapter loads back without
repeating its settings; explicit arguments override them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from models.hf.adapter import ATTN_IMPLEMENTATIONS, HFLoopedModel
from models.hf.hrm import HRM_TYPES, HrmLoop
from models.hf.retrofit import INJECTIONS, RETROFIT_TYPES, RetrofitLoop
from models.io import _atomic_write as atomic_write

SUPPORTED_MODEL_TYPES = (*RETROFIT_TYPES, *HRM_TYPES)
SETTINGS_FILE = "loopscope_hf.json"
ADAPTER_FILE = "loopscope_adapter.safetensors"
INSTALL_HINT = "pip install -e '.[hf]'"


def require_transformers() -> Any:
    """Import transformers, or raise one line naming the extra that installs it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"models.hf needs the optional dependency transformers: "
                          f"{INSTALL_HINT}") from err
    return transformers


def is_hf_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding a transformers ``config.json``."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"{str(path)!r} is not a local directory; give a Hugging Face checkpoint "
                         "directory (save_pretrained output; hub names are never downloaded)")
    if not (directory / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a Hugging Face checkpoint: it has no config.json")
    return directory


def _settings(directory: Path) -> dict[str, Any]:
    path = directory / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{str(path)!r} is not valid adapter settings JSON: {err}") from err


def from_pretrained(path: str | os.PathLike[str], loop_layers: Any = None,
                    injection: str | None = None, *, attn_implementation: str | None = None,
                    dtype: Any = None) -> HFLoopedModel:
    """Load a local transformers checkpoint directory as a loopscope ``LoopedModel``.

    Args:
        path: a directory written by ``save_pretrained`` (or by :func:`save_pretrained` here).
        loop_layers: ``(a, b)``: decoder layers ``[a, b)`` become the looped core (retrofit
            families; required unless saved with the adapter). Not used by ``hrm_text``.
        injection: ``none`` (default), ``add`` or ``concat`` (retrofit families).
        attn_implementation: ``eager`` or ``sdpa`` (default: the saved adapter's, else
            transformers' choice).
        dtype: parameter dtype passed to transformers (default: transformers' default).

    Returns:
        ``RetrofitLoop`` or ``HrmLoop`` in eval mode.

    Raises:
        ImportError: transformers is not installed (names the extra).
        ValueError: not a checkpoint directory, unsupported ``model_type``, bad layer range.

    Example:
        >>> model = from_pretrained("ckpt/llama-tiny", loop_layers=(1, 3))
        >>> logits = model(tokens, loops=8)
    """
    transformers = require_transformers()
    directory = _checkpoint_dir(path)
    hf_config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    model_type = hf_config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} in {str(directory)!r}; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    saved = _settings(directory)
    loop_layers = saved.get("loop_layers") if loop_layers is None else loop_layers
    injection = injection or saved.get("injection") or "none"
    attn_implementation = attn_implementation or saved.get("attn_implementation")
    _check_args(model_type, hf_config, loop_layers, injection, attn_implementation)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    used = hf_model.config._attn_implementation
    if used not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {used!r} is not supported by models.hf; "
                         f"pass attn_implementation one of {ATTN_IMPLEMENTATIONS}")
    model = HrmLoop(hf_model) if model_type in HRM_TYPES else \
        RetrofitLoop(hf_model, loop_layers, injection)
    _load_adapter_weights(model, directory)
    return model.eval()


def _check_args(model_type: str, hf_config: Any, loop_layers: Any, injection: str,
                attn_implementation: str | None) -> None:
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got "
                         f"{attn_implementation!r}")
    if model_type in HRM_TYPES:
        if loop_layers is not None:
            raise ValueError(f"model_type {model_type!r} is natively looped (its H-cycles are the "
                             f"loop); loop_layers does not apply, got {loop_layers!r}")
        return
    if injection not in INJECTIONS:
        raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
    if loop_layers is None:
        raise ValueError(f"model_type {model_type!r} needs loop_layers=(a, b): the decoder layers "
                         f"[a, b) to loop, 0 <= a < b <= {hf_config.num_hidden_layers}")


def _load_adapter_weights(model: HFLoopedModel, directory: Path) -> None:
    path = directory / ADAPTER_FILE
    if not path.is_file():
        return
    from safetensors.torch import load_file

    tensors = load_file(str(path), device=str(model.device))
    missing = set(model.adapter_state()) - set(tensors)
    unexpected = set(tensors) - set(model.adapter_state())
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not match this adapter (missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}); was it saved with other settings?")
    model.load_state_dict(tensors, strict=False)


def save_pretrained(model: HFLoopedModel, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to directory ``path``: the HF checkpoint plus the adapter's settings and
    weights, so ``from_pretrained(path)`` restores it with no other argument."""
    if not isinstance(model, HFLoopedModel):
        raise TypeError(f"save_pretrained expects a models.hf adapter, got {type(model).__name__}")
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    model.hf.save_pretrained(directory)
    settings = {"arch": model.config.arch, "injection": model.config.injection,
                "loop_layers": None if model.config.loop_layers is None
                else list(model.config.loop_layers),
                "attn_implementation": model.hf.config._attn_implementation}
    text = json.dumps(settings, indent=2) + "\n"
    atomic_write(directory / SETTINGS_FILE, lambda tmp: Path(tmp).write_text(text))
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.adapter_state().items()}
    atomic_write(directory / ADAPTER_FILE, lambda tmp: save_file(tensors, tmp))
    return directory
