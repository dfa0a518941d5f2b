"""Loading and saving adapted transformers checkpoints — local directories only, never the hub.

A loopscope-adapted directory is an ordinary ``save_pretrained`` directory plus two files:
``loopscope_hf.json`` (the adapter settings: loop layers, injection, attention implementation) and
``loopscope_adapter.safetensors`` (the adapter's own weights: the concat adapter and the halting
head). ``from_pretrained`` reads them when present, so a saved adapter loads back without
repeating its settings; explicit arguments override them.

A study fine-tunes an adapter and stores it like every other loopscope model, in one
``model.safetensors`` (``models.save_model``): the full state dict, with the transformers config
and the adapter settings in its metadata (``hf_metadata``), so ``models.load_model`` rebuilds it
(``rebuild``: ``from_config`` + the stored weights) without the original checkpoint directory.
``inspect_checkpoint`` checks a directory without loading weights (what the config validator
runs); ``checkpoint_identity`` fingerprints its files (the run directory's fingerprint holds it,
so a checkpoint changed at the same path never resumes or skips a run made with the old one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from models.hf.adapter import ATTN_IMPLEMENTATIONS, HFLoopedModel
from models.hf.hrm import HRM_TYPES, HrmLoop
from models.hf.retrofit import INJECTIONS, RETROFIT_TYPES, RetrofitLoop, check_loop_layers
from models.io import _atomic_write as atomic_write

SUPPORTED_MODEL_TYPES = (*RETROFIT_TYPES, *HRM_TYPES)
SETTINGS_FILE = "loopscope_hf.json"
ADAPTER_FILE = "loopscope_adapter.safetensors"
INSTALL_HINT = "pip install -e '.[hf]'"
# what a study may train: every weight, the looped core (+ injection adapter and halting head),
# or the halting head alone (a frozen checkpoint whose exit gate learns when to stop)
TRAINABLE = ("all", "loop", "head")
HEAD_MODULES = ("halt_head.", "halt_norm.")
# checkpoint files up to this size are hashed in full; larger ones (weights) by size, mtime and
# their first and last MiB (hashing many GB at every run start would cost minutes)
FULL_HASH_BYTES = 64 * 2**20
SAMPLE_BYTES = 2**20


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
                    dtype: Any = None, trainable: str = "all") -> HFLoopedModel:
    """Load a local transformers checkpoint directory as a loopscope ``LoopedModel``.

    Args:
        path: a directory written by ``save_pretrained`` (or by :func:`save_pretrained` here).
        loop_layers: ``(a, b)``: decoder layers ``[a, b)`` become the looped core (retrofit
            families; required unless saved with the adapter). Not used by ``hrm_text``.
        injection: ``none`` (default), ``add`` or ``concat`` (retrofit families).
        attn_implementation: ``eager`` or ``sdpa`` (default: the saved adapter's, else
            transformers' choice).
        dtype: parameter dtype passed to transformers (default: transformers' default).
        trainable: which parameters keep ``requires_grad`` (see :func:`set_trainable`).

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
    _, settings = inspect_checkpoint(directory, loop_layers, injection,
                                     attn_implementation=attn_implementation)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if settings["attn_implementation"] is not None:
        kwargs["attn_implementation"] = settings["attn_implementation"]
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _no_progress_bar(transformers):  # a study loads it once per model: no bar each time
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model = _wrap(hf_model, settings)
    _load_adapter_weights(model, directory)
    return set_trainable(model, trainable).eval()


@contextlib.contextmanager
def _no_progress_bar(transformers: Any) -> Iterator[None]:
    logging = transformers.utils.logging
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def inspect_checkpoint(path: str | os.PathLike[str], loop_layers: Any = None,
                       injection: str | None = None, *, attn_implementation: str | None = None
                       ) -> tuple[Any, dict[str, Any]]:
    """Check a checkpoint directory and the adapter arguments without loading any weight.

    Returns:
        The transformers config and the effective adapter settings (``model_type``,
        ``loop_layers`` as a tuple or ``None``, ``injection``, ``attn_implementation``), the
        saved adapter's settings filling what is not given.

    Raises:
        ImportError: transformers is not installed (names the extra).
        ValueError: not a checkpoint directory, unsupported ``model_type``, bad arguments.
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
    if model_type not in HRM_TYPES:
        loop_layers = check_loop_layers(loop_layers, hf_config.num_hidden_layers)
    return hf_config, {"model_type": model_type, "loop_layers": loop_layers,
                       "injection": injection, "attn_implementation": attn_implementation}


def _wrap(hf_model: Any, settings: dict[str, Any]) -> HFLoopedModel:
    used = hf_model.config._attn_implementation
    if used not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {used!r} is not supported by models.hf; "
                         f"pass attn_implementation one of {ATTN_IMPLEMENTATIONS}")
    if hf_model.config.model_type in HRM_TYPES:
        return HrmLoop(hf_model)
    return RetrofitLoop(hf_model, settings["loop_layers"], settings["injection"])


def set_trainable(model: HFLoopedModel, trainable: str) -> HFLoopedModel:
    """Freeze all but the chosen parameters (``requires_grad``); returns ``model``.

    ``all``: every weight; ``loop``: the looped core (retrofit: decoder layers ``[a, b)``; HRM:
    its L and H modules), the injection adapter and the halting head; ``head``: the halting head
    alone (``halt_head`` / ``halt_norm``) — the exit gate learns on a frozen checkpoint.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if trainable == "all":
        keep = list(model.parameters())
    else:
        keep = [*model.halt_head.parameters(), *model.halt_norm.parameters()]
    if trainable == "loop":
        keep += [p for module in model.loop_modules() for p in module.parameters()]
    chosen = {id(p) for p in keep}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    return model


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


# -- a fine-tuned adapter inside one .safetensors (models.save_model / models.load_model) ---------
def hf_metadata(model: HFLoopedModel) -> dict[str, Any]:
    """What ``rebuild`` needs besides the weights: the transformers config and adapter settings."""
    return {"hf_config": json.loads(model.hf.config.to_json_string()),
            "loop_layers": None if model.config.loop_layers is None
            else list(model.config.loop_layers),
            "injection": model.config.injection,
            "attn_implementation": model.hf.config._attn_implementation}


def rebuild(meta: dict[str, Any], dtype: Any = None) -> HFLoopedModel:
    """An adapter of the architecture ``hf_metadata`` describes, with fresh weights (load the
    stored state dict into it); no checkpoint directory is read."""
    transformers = require_transformers()
    values = dict(meta["hf_config"])
    model_type = values.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"stored model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    hf_config = transformers.AutoConfig.for_model(model_type, **values)
    kwargs: dict[str, Any] = {}
    if meta.get("attn_implementation") is not None:
        kwargs["attn_implementation"] = meta["attn_implementation"]
    if dtype is not None:
        kwargs["dtype"] = dtype
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
    return _wrap(hf_model, meta).eval()


def checkpoint_identity(path: str | os.PathLike[str]) -> str:
    """SHA-256 over a checkpoint directory's files (names, sizes and contents; files larger than
    64 MiB by size, mtime and their first and last MiB), so a checkpoint replaced at the same
    path gets another identity. Subdirectories and hidden files are not part of it."""
    directory = _checkpoint_dir(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.iterdir() if p.is_file()
                       and not p.name.startswith(".")):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as handle:
            if size <= FULL_HASH_BYTES:
                digest.update(handle.read())
                continue
            digest.update(str(file.stat().st_mtime_ns).encode())
            digest.update(handle.read(SAMPLE_BYTES))
            handle.seek(size - SAMPLE_BYTES)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()
