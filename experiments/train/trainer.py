"""Training one looped model under one controller objective: a plain, resumable loop.

AdamW (Loshchilov & Hutter 2019) with linear warm-up then cosine decay to ``lr * min_lr_ratio``,
gradient-norm clipping, seeded data (a ``torch.Generator`` per stream), tqdm progress with loss and
tokens/s, validation every ``eval_every`` steps, and checkpoints every ``checkpoint_every`` steps.

The loss is the sum of ``controller.loss_terms(out, targets)`` — the trainer never branches on the
controller type (fixed/convergence/solver give the task loss; ACT, PonderNet, Ouro, halt token and
Q-halt give their objectives). Optional Huginn randomised depth (``random_depth``, arXiv
2502.05171): each step's loop cap is drawn with ``halting.sample_training_depth`` (mean = the
planned depth, clamped to 4x it), optionally with truncated backprop (``grad_steps``).

Checkpoints (``<model dir>/ckpt/step_NNNNNN/``): ``model.safetensors`` + ``model.json``
(``models.save_model``) and ``state.pt`` (optimizer, scheduler, controller parameters, the data /
depth generator states, torch's RNG state, step, history). A checkpoint directory is written under a
temporary name and renamed into place, then the ``ckpt/latest`` pointer is replaced atomically,
then older checkpoints are deleted — so a kill at any moment leaves a complete checkpoint. A killed
run resumes from ``latest`` and (on CPU, same thread count) ends bit-identical to an uninterrupted
run. A non-finite loss stops training with a message naming the step; the last good checkpoint is
kept and ``status.json`` records ``{"status": "failed", "step": ...}``.

Distributed data parallel (``torchrun``): the process group is initialised from the environment
(gloo on CPU, nccl on CUDA); each rank draws its own data stream, gradients are averaged with
``all_reduce`` after each backward (equivalent to DDP's averaging; ``run_loop`` drives
``prepare``/``step``/``readout`` rather than ``forward``, so ``DistributedDataParallel``'s forward
hooks would not fire), and only rank 0 writes anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from experiments.errors import CheckpointError, one_line
from experiments.results import atomic_write_text

STATUS_FILE = "status.json"


class TrainingFailed(RuntimeError):
    """Training stopped on a non-finite loss; ``step`` is where, ``checkpoint`` the kept one."""

    def __init__(self, message: str, step: int, checkpoint: int | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainPlan:
    """One model to train.

    Attributes:
        run_id: unique name, also the model's directory name (e.g. ``parallel_loop-fixed-L2``).
        arch: architecture key.
        model_fields: full ``ModelConfig`` fields (task fields filled in).
        objective: the controller name whose ``loss_terms`` are optimised.
        controller_cfg: the controller config (``name`` + params).
        loops: training depth (fixed objective) or loop cap (learned objectives).
        task_cfg: the task config (``name`` + params), saved beside the model for
            ``loopscope-diagnose``.
    """

    run_id: str
    arch: str
    model_fields: dict[str, Any]
    objective: str
    controller_cfg: dict[str, Any]
    loops: int
    task_cfg: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """A trained model, its (possibly trained) controller, and what happened."""

    plan: TrainPlan
    model: nn.Module
    controller: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    status: str = "finished"
    resumed_from: int | None = None


@dataclass
class DistInfo:
    """Rank and world size; ``enabled`` when a process group is in use."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op when world == 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` -> CUDA when available (this rank's local GPU under torchrun), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info is not None and info.enabled:
        name = f"cuda:{info.local_rank}"
    return torch.device(name)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def read_status(directory: Path) -> dict[str, Any] | None:
    """The ``status.json`` in ``directory`` (None when absent or unreadable)."""
    path = Path(directory) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_status(directory: Path, status: str, **fields: Any) -> None:
    atomic_write_text(Path(directory) / STATUS_FILE, json.dumps({"status": status, **fields}))


def train_model(plan: TrainPlan, task: Any, train_cfg: dict[str, Any], model_dir: Path,
                seed: int, info: DistInfo | None = None) -> TrainResult:
    """Train (or resume, or load when already finished) one model; see the module docstring.

    Args:
        plan: what to train.
        task: an ``experiments.tasks.Task``.
        train_cfg: the validated ``train`` config section.
        model_dir: where checkpoints, the final model and ``status.json`` go.
        seed: seeds the initial weights and every data stream.
        info: distributed rank/world (default: single process).

    Raises:
        TrainingFailed: the loss became NaN/Inf (message names the step).
    """
    info = info or DistInfo()
    device = resolve_device(train_cfg["device"], info)
    trainer = _Trainer(plan, task, train_cfg, Path(model_dir), seed, info, device)
    status = read_status(trainer.model_dir)
    if status and status.get("status") == "finished" and trainer.final_path.exists():
        return trainer.load_finished(status)
    return trainer.fit()


class _Trainer:
    """State of one training run; methods are the loop's pieces (read top to bottom)."""

    def __init__(self, plan: TrainPlan, task: Any, cfg: dict[str, Any], model_dir: Path,
                 seed: int, info: DistInfo, device: torch.device) -> None:
        from halting import build_controller
        from models import build_model

        self.plan, self.task, self.cfg, self.info, self.device = plan, task, cfg, info, device
        self.model_dir = model_dir
        self.final_path = model_dir / "model.safetensors"
        torch.manual_seed(seed)
        self.model = build_model(dict(plan.model_fields)).to(device)
        self.controller = build_controller(dict(plan.controller_cfg)).to(device)
        # bind first: q_halt creates its Q-head here, and the optimiser and a resumed checkpoint
        # must both see it
        self.controller.bind(self.model)
        self.params = [p for p in [*self.model.parameters(), *self.controller.parameters()]
                       if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
            weight_decay=cfg["weight_decay"],
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg["steps"], cfg["warmup_steps"], cfg["min_lr_ratio"]),
        )
        # separate seeded streams: training data (per rank), loop depth, the fixed val batch
        self.data_gen = torch.Generator().manual_seed(seed * 1_000_003 + 17 + info.rank)
        self.depth_gen = torch.Generator().manual_seed(seed * 1_000_003 + 29)
        val_gen = torch.Generator().manual_seed(seed * 1_000_003 + 41)
        self.val_batch = task.batch("val", cfg["eval_batch_size"], val_gen).to(device)
        self.batch_size = max(1, cfg["batch_size"] // info.world)
        self.step, self.history, self.last_ckpt = 0, [], None
        self.resumed_from: int | None = None

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self._broadcast_parameters()
        self._resume()
        steps = self.cfg["steps"]
        show = self.cfg["progress"] and self.info.is_main
        bar = tqdm(total=steps, initial=self.step, desc=f"train {self.plan.run_id}",
                   disable=not show, leave=False, dynamic_ncols=True)
        started, tokens_seen = time.perf_counter(), 0
        while self.step < steps:
            loss, tokens = self._train_step()
            self.step += 1
            tokens_seen += tokens
            rate = tokens_seen / max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            self._after_step(loss)
        bar.close()
        self._save_final()
        return TrainResult(self.plan, self.model, self.controller, self.history,
                           resumed_from=self.resumed_from)

    def _train_step(self) -> tuple[float, int]:
        from halting import run_loop, sample_training_depth

        self.model.train()
        self.controller.train()
        batch = self.task.batch("train", self.batch_size, self.data_gen).to(self.device)
        depth = self.plan.loops
        if self.cfg["random_depth"]:
            depth = sample_training_depth(self.plan.loops, self.cfg["random_depth_sigma"],
                                          self.depth_gen, max_loops=4 * self.plan.loops)
        with autocast_for(self.device):
            out = run_loop(self.model, batch.tokens, self.controller, max_loops=depth,
                           granularity=self.cfg["granularity"], grad_steps=self.cfg["grad_steps"])
            terms = self.controller.loss_terms(out, batch.targets)
            loss = sum(terms.values())
        self._check_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients()
        if self.cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg["grad_clip"])
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()), batch.tokens.numel() * self.info.world

    def _check_finite(self, loss: Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0],
                           device=self.device)
        if self.info.enabled:
            dist.all_reduce(bad)
        if bad.item() == 0:
            return
        step = self.step + 1
        kept = f"kept the last good checkpoint (step {self.last_ckpt})" if self.last_ckpt else \
            "no checkpoint had been written yet"
        message = (f"training {self.plan.run_id} stopped: loss is {float(loss.detach())} at step "
                   f"{step}; {kept}")
        if self.info.is_main:
            write_status(self.model_dir, "failed", step=step, checkpoint=self.last_ckpt,
                         message=message)
        raise TrainingFailed(message, step, self.last_ckpt)

    def _after_step(self, loss: float) -> None:
        every, last = self.cfg["eval_every"], self.step == self.cfg["steps"]
        if last or (every and self.step % every == 0):
            metrics = self.validate()
            metrics.update(step=self.step, train_loss=loss, lr=self.scheduler.get_last_lr()[0])
            self.history.append(metrics)
        every = self.cfg["checkpoint_every"]
        if every and self.step % every == 0 and not last:
            self._save_checkpoint()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss / accuracy / mean loops of the controller (eval mode) on the fixed val batch."""
        from halting import run_loop

        self.model.eval()
        self.controller.eval()
        with autocast_for(self.device):
            out = run_loop(self.model, self.val_batch.tokens, self.controller,
                           max_loops=self.plan.loops, granularity=self.cfg["granularity"])
        scores = self.task.score(out.logits.float(), self.val_batch)
        return {"val_loss": float(scores["loss"].mean()),
                "val_accuracy": float(scores["correct"].float().mean()),
                "val_mean_loops": float(out.depth.float().mean())}

    # -- distributed -----------------------------------------------------------------------------
    def _broadcast_parameters(self) -> None:
        if self.info.enabled:
            for tensor in [*self.model.state_dict().values(), *self.params]:
                dist.broadcast(tensor.data, src=0)

    def _average_gradients(self) -> None:
        if not self.info.enabled:
            return
        for param in self.params:
            if param.grad is None:  # same pattern on every rank; all_reduce needs a tensor
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad /= self.info.world

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.model_dir / "ckpt"

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": self.controller.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "depth_gen": self.depth_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": list(self.history),
        }

    def _save_checkpoint(self) -> None:
        if not self.info.is_main:
            return
        from models import save_model

        name = f"step_{self.step:06d}"
        staging = self.ckpt_root / f".tmp_{name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_model(self.model, staging / "model.safetensors")
        torch.save(self._state(), staging / "state.pt")
        final = self.ckpt_root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)  # directory rename: atomic on POSIX
        atomic_write_text(self.ckpt_root / "latest", name)
        for old in self.ckpt_root.glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        self.last_ckpt = self.step
        write_status(self.model_dir, "running", step=self.step, checkpoint=self.step)

    def _resume(self) -> None:
        pointer = self.ckpt_root / "latest"
        if not pointer.exists():
            return
        directory = self.ckpt_root / pointer.read_text().strip()
        self._load_weights(directory / "model.safetensors")
        state = self._load_pickle(directory / "state.pt")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.controller.load_state_dict(state["controller"])
            self.data_gen.set_state(state["data_gen"])
            self.depth_gen.set_state(state["depth_gen"])
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            self.step, self.history = state["step"], list(state["history"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"cannot resume from {str(directory)!r}: {one_line(err)}; "
                                  f"{self._remedy()}") from None
        self.last_ckpt = self.resumed_from = self.step

    def _remedy(self) -> str:
        return (f"re-run with a new out_dir, or delete {str(self.model_dir)!r} to retrain "
                "this model")

    def _load_weights(self, path: Path) -> None:
        """Load a saved model into ``self.model``; ``CheckpointError`` if unreadable or if it was
        written for another model config (nothing on disk is touched)."""
        from models import load_model

        try:
            loaded = load_model(path, map_location=self.device)
        except (ValueError, OSError, KeyError) as err:
            raise CheckpointError(f"{one_line(err)}; {self._remedy()}") from None
        saved, wanted = loaded.config.to_dict(), self.model.config.to_dict()
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if diff:
            fields = ", ".join(f"{k}={saved.get(k)!r} (config: {wanted.get(k)!r})" for k in diff)
            raise CheckpointError(f"checkpoint {str(path)!r} was written for another model "
                                  f"config: {fields}; {self._remedy()}")
        self.model.load_state_dict(loaded.state_dict())

    def _load_pickle(self, path: Path) -> dict[str, Any]:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # torch.load raises many types for truncated/corrupt files
            raise CheckpointError(f"cannot read {str(path)!r} (truncated or corrupt?): "
                                  f"{one_line(err)}; {self._remedy()}") from None

    def _save_final(self) -> None:
        if not self.info.is_main:
            return
        from models import save_model

        staging = self.model_dir / ".tmp_final"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_model(self.model, staging / "model.safetensors")
        torch.save({"controller": self.controller.state_dict()}, staging / "controller.pt")
        for item in sorted(staging.iterdir()):
            os.replace(item, self.model_dir / item.name)
        shutil.rmtree(staging, ignore_errors=True)
        atomic_write_text(self.model_dir / "train.json", json.dumps(
            {"plan": self.plan.__dict__, "history": self.history,
             "resumed_from": self.resumed_from}, indent=1, default=str))
        write_status(self.model_dir, "finished", step=self.step)
        shutil.rmtree(self.ckpt_root, ignore_errors=True)

    def load_finished(self, status: dict[str, Any]) -> TrainResult:
        """Reload a model whose training finished earlier (another process or invocation)."""
        self._load_weights(self.final_path)
        extra = self._load_pickle(self.model_dir / "controller.pt")
        try:
            self.controller.load_state_dict(extra["controller"])
            info = json.loads((self.model_dir / "train.json").read_text())
        except (KeyError, ValueError, RuntimeError, OSError) as err:
            raise CheckpointError(f"cannot reload the finished model in "
                                  f"{str(self.model_dir)!r}: {one_line(err)}; "
                                  f"{self._remedy()}") from None
        return TrainResult(self.plan, self.model, self.controller, info["history"],
                           resumed_from=info.get("resumed_from"))
