"""Training one looped model under one controller objective: a plain, resumable loop.

AdamW (Loshchilov & Hutter 2019) with linear warm-up then cosine decay to ``lr * min_lr_ratio``,
gradient-norm clipping, seeded data (a ``torch.Generator`` per stream), tqdm progress with loss and
tokens/s, validation every ``eval_every`` steps, and checkpoints every ``checkpoint_every`` steps.

The loss is the sum of ``controller.loss_terms(out, targets)`` — the trainer never branches on the
controller type (fixed/convergence/solver give the task loss; ACT, PonderNet, Ouro, halt token and
Q-halt give their objectives). Optional Huginn randomised depth (``random_depth``, arXiv
2502.05171): each step's loop cap is drawn with ``halting.sample_training_depth`` (mean = the
planned depth, clamped to 4x it), optionally with truncated backprop (``grad_steps``).

The loop is here; checkpoints and ``status.json`` are ``experiments.train.checkpoints``, the
data-parallel pieces ``experiments.train.distributed``. A non-finite loss stops training with a
message naming the step; the last good checkpoint is kept and ``status.json`` records
``{"status": "failed", "step": ...}``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from experiments.errors import CheckpointError, one_line
from experiments.train.checkpoints import ModelDir, read_status, write_status
from experiments.train.distributed import (
    DistInfo,
    any_rank,
    average_gradients,
    broadcast_from_main,
    resolve_device,
)


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
        finetune: ``False``: nothing is trained or written; the model is evaluated as built
            (a Hugging Face checkpoint with ``model.finetune=false``).
    """

    run_id: str
    arch: str
    model_fields: dict[str, Any]
    objective: str
    controller_cfg: dict[str, Any]
    loops: int
    task_cfg: dict[str, Any] = field(default_factory=dict)
    finetune: bool = True


@dataclass
class TrainResult:
    """A trained model, its (possibly trained) controller, and what happened."""

    plan: TrainPlan
    model: nn.Module
    controller: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    status: str = "finished"
    resumed_from: int | None = None


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
    if not plan.finetune:
        return TrainResult(plan, trainer.model.eval(), trainer.controller.eval(),
                           status="not trained")
    status = read_status(trainer.model_dir)
    if status and status.get("status") == "finished" and trainer.store.final_path.exists():
        return trainer.load_finished()
    return trainer.fit()


class _Trainer:
    """State of one training run; methods are the loop's pieces (read top to bottom)."""

    def __init__(self, plan: TrainPlan, task: Any, cfg: dict[str, Any], model_dir: Path,
                 seed: int, info: DistInfo, device: torch.device) -> None:
        from halting import build_controller
        from models import build_model

        self.plan, self.task, self.cfg, self.info, self.device = plan, task, cfg, info, device
        self.model_dir = model_dir
        self.store = ModelDir(model_dir, device)
        torch.manual_seed(seed)
        self.model = build_model(dict(plan.model_fields)).to(device)
        self.controller = build_controller(dict(plan.controller_cfg)).to(device)
        # bind first: q_halt creates its Q-head here, and the optimiser and a resumed checkpoint
        # must both see it
        self.controller.bind(self.model)
        self.params = [p for p in [*self.model.parameters(), *self.controller.parameters()]
                       if p.requires_grad]
        # built on first use (``optimizer``): reloading a finished model needs neither, and the
        # first optimizer of a process imports torch._dynamo (~1.5 s of the study's main process)
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        # separate seeded streams: training data (per rank), loop depth, the fixed val batch
        self.data_gen = torch.Generator().manual_seed(seed * 1_000_003 + 17 + info.rank)
        self.depth_gen = torch.Generator().manual_seed(seed * 1_000_003 + 29)
        val_gen = torch.Generator().manual_seed(seed * 1_000_003 + 41)
        self.val_batch = task.batch("val", cfg["eval_batch_size"], val_gen).to(device)
        self.batch_size = max(1, cfg["batch_size"] // info.world)
        self.step, self.history, self.last_ckpt = 0, [], None
        self.resumed_from: int | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW over ``params`` (built on first use, with ``scheduler``)."""
        if self._optimizer is None:
            self._build_optimizer()
        return self._optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        """Warm-up then cosine decay of ``optimizer``'s learning rate (built with it)."""
        if self._scheduler is None:
            self._build_optimizer()
        return self._scheduler

    def _build_optimizer(self) -> None:
        # both at once, in this order, before any state is loaded into either: the scheduler
        # sets the optimizer's initial learning rate when it is built
        cfg = self.cfg
        # foreach: one call per operation over every parameter instead of a Python loop over
        # them (torch's default only on CUDA); the same elementwise arithmetic in the same order,
        # so the weights are bit-identical to the per-tensor loop (tests/experiments/test_train.py)
        # — unlike ``fused``, which rounds differently
        self._optimizer = torch.optim.AdamW(
            self.params, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
            weight_decay=cfg["weight_decay"], foreach=True,
        )
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._optimizer,
            lambda s: lr_factor(s, cfg["steps"], cfg["warmup_steps"], cfg["min_lr_ratio"]),
        )

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        broadcast_from_main([*self.model.state_dict().values(), *self.params], self.info)
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

        self._set_mode(training=True)
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
        average_gradients(self.params, self.info)
        if self.cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg["grad_clip"])
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()), batch.tokens.numel() * self.info.world

    def _set_mode(self, training: bool) -> None:
        """Model and controller in train (or eval) mode. ``Module.train`` walks every submodule
        of the model (~1 ms a call), so the model's runs only when its mode changes (around a
        validation), not on every step; the controller's (it records the mode it was given) is
        set every time."""
        if self.model.training != training:
            self.model.train(training)
        self.controller.train(training)

    def _check_finite(self, loss: Tensor) -> None:
        if not any_rank(not torch.isfinite(loss.detach()).all(), self.info, self.device):
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

        self._set_mode(training=False)
        with autocast_for(self.device):
            out = run_loop(self.model, self.val_batch.tokens, self.controller,
                           max_loops=self.plan.loops, granularity=self.cfg["granularity"])
        scores = self.task.score(out.logits.float(), self.val_batch)
        return {"val_loss": float(scores["loss"].mean()),
                "val_accuracy": float(scores["correct"].float().mean()),
                "val_mean_loops": float(out.depth.float().mean())}

    # -- checkpoints (experiments.train.checkpoints) --------------------------------------------
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
        self.store.save_checkpoint(self.step, self.model, self._state())
        self.last_ckpt = self.step

    def _resume(self) -> None:
        directory = self.store.latest()
        if directory is None:
            return
        self.store.load_weights(self.model, directory / "model.safetensors")
        state = self.store.load_pickle(directory / "state.pt")
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
                                  f"{self.store.remedy()}") from None
        self.last_ckpt = self.resumed_from = self.step

    def _save_final(self) -> None:
        if not self.info.is_main:
            return
        info = {"plan": self.plan.__dict__, "history": self.history,
                "resumed_from": self.resumed_from}
        self.store.save_final(self.model, self.controller, info, self.step)

    def load_finished(self) -> TrainResult:
        """Reload a model whose training finished earlier (another process or invocation)."""
        info = self.store.load_final(self.model, self.controller)
        return TrainResult(self.plan, self.model, self.controller, info["history"],
                           resumed_from=info.get("resumed_from"))
