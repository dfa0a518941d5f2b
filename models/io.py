"""Checkpoints: weights as ``*.safetensors`` with the config as JSON in its metadata (key
``loopscope_config``) and in ``<stem>.json`` beside it. Writes are atomic (temp file + rename).

A ``models.hf`` adapter is stored the same way, plus its transformers config and adapter settings
under the metadata key ``loopscope_hf`` (``models.hf.hf_metadata``); ``load_model`` rebuilds it
from those (``models.hf.rebuild``), so the file does not depend on the directory it came from."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.base import LoopedModel
from models.build import build_model
from models.config import ModelConfig

CONFIG_KEY = "loopscope_config"
HF_KEY = "loopscope_hf"


def _is_hf(model: LoopedModel) -> bool:
    from models.build import HF_ARCHS

    return getattr(model.config, "arch", None) in (*HF_ARCHS, "hf_hrm")


def _checkpoint_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
    return path


def _unique_tensors(model: LoopedModel) -> dict[str, torch.Tensor]:
    """The state dict without aliases (tied embeddings share one storage; safetensors refuses)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0o022)  # there is no umask getter; mkstemp's 0600 must follow it
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(model: LoopedModel, path: str | os.PathLike[str]) -> Path:
    """Write ``path`` (``*.safetensors``) and ``<stem>.json``; returns the checkpoint path."""
    path = _checkpoint_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(model.config.to_dict(), sort_keys=True)
    tensors = _unique_tensors(model)
    metadata = {CONFIG_KEY: config_json, "format": "pt"}
    if _is_hf(model):
        from models.hf import hf_metadata

        metadata[HF_KEY] = json.dumps(hf_metadata(model), sort_keys=True)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def write_json(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")

    _atomic_write(path.with_suffix(".json"), write_json)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} (truncated or corrupt?): {err}"
        ) from err
    return tensors, metadata


def _config(path: Path, metadata: dict[str, str]) -> ModelConfig:
    return ModelConfig.from_dict(_config_values(path, metadata))


def _config_values(path: Path, metadata: dict[str, str]) -> dict:
    if CONFIG_KEY not in metadata:
        raise ValueError(f"checkpoint {str(path)!r} has no {CONFIG_KEY!r} metadata")
    try:
        values = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {str(path)!r}: config metadata is not JSON: {err}") from None
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        try:
            beside = json.loads(sidecar.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(sidecar)!r} is not valid JSON: {err}") from None
        if beside != values:
            diff = sorted(k for k in set(beside) | set(values) if beside.get(k) != values.get(k))
            raise ValueError(
                f"config {str(sidecar)!r} disagrees with the metadata of {str(path)!r} on {diff}"
            )
    return values


def _build(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]
           ) -> tuple[LoopedModel, str]:
    """The model a checkpoint describes, with fresh weights, and its arch name."""
    if HF_KEY not in metadata:
        config = _config(path, metadata)
        return build_model(config), config.arch
    from models.hf import rebuild

    values = _config_values(path, metadata)
    try:
        meta = json.loads(metadata[HF_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {str(path)!r}: {HF_KEY} metadata is not JSON: "
                         f"{err}") from None
    dtype = next((t.dtype for t in tensors.values() if t.dtype.is_floating_point), None)
    model = rebuild(meta, dtype=dtype)
    if model.config.to_dict() != values:
        raise ValueError(f"checkpoint {str(path)!r}: its {HF_KEY} metadata does not rebuild the "
                         f"model its {CONFIG_KEY} describes")
    return model, str(values.get("arch"))


def load_model(path: str | os.PathLike[str], map_location: str | torch.device | None = None
               ) -> LoopedModel:
    """Rebuild a model saved by ``save_model``, in eval mode (call ``.train()`` to resume).

    ``ValueError`` when the file is truncated/corrupt or its config and weights disagree.

    Args:
        path: the ``*.safetensors`` file.
        map_location: device for the model (default CPU).
    """
    path = _checkpoint_path(path)
    tensors, metadata = _read(path)
    model, arch = _build(path, metadata, tensors)
    expected = model.state_dict()
    aliases = set(expected) - set(_unique_tensors(model))  # tied names stored once
    missing = sorted(set(expected) - set(tensors) - aliases)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match its config (arch={arch!r}): "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for name, tensor in tensors.items():
        if tensor.dtype.is_floating_point != expected[name].dtype.is_floating_point:
            # load_state_dict would cast silently: integer weights load as garbage floats
            raise ValueError(
                f"checkpoint {str(path)!r}: {name} has dtype {tensor.dtype}, the model expects "
                f"{expected[name].dtype}; not a checkpoint of this model"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"checkpoint {str(path)!r} does not match its config: {name} has shape "
                f"{tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    model.eval()
    return model.to(map_location) if map_location is not None else model
