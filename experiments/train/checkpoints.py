"""A model directory on disk: resumable checkpoints, the final model and ``status.json``.

Checkpoints (``<model dir>/ckpt/step_NNNNNN/``): ``model.safetensors`` + ``model.json``
(``models.save_model``) and ``state.pt`` (optimizer, scheduler, controller parameters, the data /
depth generator states, torch's RNG state, step, history). A checkpoint directory is written under a
temporary name and renamed into place, then the ``ckpt/latest`` pointer is replaced atomically,
then older checkpoints are deleted — so a kill at any moment leaves a complete checkpoint. A killed
run resumes from ``latest`` and (on CPU, same thread count) ends bit-identical to an uninterrupted
run.

Everything read back is checked: an unreadable file or one written for another model config is a
``CheckpointError`` naming the path and the remedy, and nothing on disk is touched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.errors import CheckpointError, one_line
from experiments.results import atomic_write_text

STATUS_FILE = "status.json"


def read_status(directory: Path) -> dict[str, Any] | None:
    """The ``status.json`` in ``directory`` (None when absent or unreadable)."""
    path = Path(directory) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_status(directory: Path, status: str, **fields: Any) -> None:
    """Replace ``directory/status.json`` atomically with ``{"status": status, **fields}``."""
    atomic_write_text(Path(directory) / STATUS_FILE, json.dumps({"status": status, **fields}))


class ModelDir:
    """Checkpoints and the final model of one training run, under ``model_dir``."""

    def __init__(self, model_dir: Path, device: torch.device) -> None:
        self.path, self.device = Path(model_dir), device
        self.final_path = self.path / "model.safetensors"
        self.ckpt_root = self.path / "ckpt"

    def remedy(self) -> str:
        """What the user can do about a bad checkpoint (the tail of every error)."""
        return f"re-run with a new out_dir, or delete {str(self.path)!r} to retrain this model"

    def save_checkpoint(self, step: int, model: nn.Module, state: dict[str, Any]) -> None:
        """Write ``ckpt/step_NNNNNN`` (weights + ``state``), point ``latest`` at it, drop older."""
        from models import save_model

        name = f"step_{step:06d}"
        staging = self.ckpt_root / f".tmp_{name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_model(model, staging / "model.safetensors")
        torch.save(state, staging / "state.pt")
        final = self.ckpt_root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)  # directory rename: atomic on POSIX
        atomic_write_text(self.ckpt_root / "latest", name)
        for old in self.ckpt_root.glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        write_status(self.path, "running", step=step, checkpoint=step)

    def latest(self) -> Path | None:
        """The directory ``ckpt/latest`` points at, or None when there is no checkpoint."""
        pointer = self.ckpt_root / "latest"
        if not pointer.exists():
            return None
        return self.ckpt_root / pointer.read_text().strip()

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """Load a saved model into ``model``; ``CheckpointError`` if unreadable or if it was
        written for another model config (nothing on disk is touched)."""
        from models import load_model

        try:
            loaded = load_model(path, map_location=self.device)
        except (ValueError, OSError, KeyError) as err:
            raise CheckpointError(f"{one_line(err)}; {self.remedy()}") from None
        saved, wanted = loaded.config.to_dict(), model.config.to_dict()
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if diff:
            fields = ", ".join(f"{k}={saved.get(k)!r} (config: {wanted.get(k)!r})" for k in diff)
            raise CheckpointError(f"checkpoint {str(path)!r} was written for another model "
                                  f"config: {fields}; {self.remedy()}")
        model.load_state_dict(loaded.state_dict())

    def load_pickle(self, path: Path) -> dict[str, Any]:
        """A ``torch.save``-d dict; ``CheckpointError`` when truncated or corrupt."""
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # torch.load raises many types for truncated/corrupt files
            raise CheckpointError(f"cannot read {str(path)!r} (truncated or corrupt?): "
                                  f"{one_line(err)}; {self.remedy()}") from None

    def save_final(self, model: nn.Module, controller: nn.Module, info: dict[str, Any],
                   step: int) -> None:
        """Write the final model, controller and ``train.json``; mark finished; drop ``ckpt/``."""
        from models import save_model

        staging = self.path / ".tmp_final"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_model(model, staging / "model.safetensors")
        torch.save({"controller": controller.state_dict()}, staging / "controller.pt")
        for item in sorted(staging.iterdir()):
            os.replace(item, self.path / item.name)
        shutil.rmtree(staging, ignore_errors=True)
        atomic_write_text(self.path / "train.json", json.dumps(info, indent=1, default=str))
        write_status(self.path, "finished", step=step)
        shutil.rmtree(self.ckpt_root, ignore_errors=True)

    def load_final(self, model: nn.Module, controller: nn.Module) -> dict[str, Any]:
        """Reload a finished run into ``model`` and ``controller``; return its ``train.json``."""
        self.load_weights(model, self.final_path)
        extra = self.load_pickle(self.path / "controller.pt")
        try:
            controller.load_state_dict(extra["controller"])
            return json.loads((self.path / "train.json").read_text())
        except (KeyError, ValueError, RuntimeError, OSError) as err:
            raise CheckpointError(f"cannot reload the finished model in {str(self.path)!r}: "
                                  f"{one_line(err)}; {self.remedy()}") from None
