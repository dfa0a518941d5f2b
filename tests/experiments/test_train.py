"""Training: schedule, determinism, resume after a kill, NaN handling, randomised depth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from _app_helpers import ROOT, TINY, compose_cfg

import halting
from experiments.config.validate import validate_config
from experiments.study import plan_models, run
from experiments.train import TrainingFailed, lr_factor, train_model
from experiments.train.trainer import _Trainer


def first_plan(overrides: list[str]):
    valid = validate_config(compose_cfg(overrides))
    return plan_models(valid.cfg, valid)[0], valid


def final_metrics(out: Path) -> tuple[pd.DataFrame, list]:
    results = pd.read_parquet(out / "results.parquet")
    history = json.loads((out / "run.json").read_text())["models"][0]["final"]
    return results, history


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_same_seed_gives_identical_results(tmp_path):
    run(compose_cfg(TINY), out_dir=tmp_path / "a")
    run(compose_cfg(TINY), out_dir=tmp_path / "b")
    # decode.json (wall-clock) is written beside the tables and leaves them bit-identical
    assert all((tmp_path / d / "decode.json").is_file() for d in "ab")
    pd.testing.assert_frame_equal(*(pd.read_parquet(tmp_path / d / "results.parquet")
                                    for d in "ab"), check_exact=True)
    run(compose_cfg([*TINY, "seed=1"]), out_dir=tmp_path / "c")
    a, c = (pd.read_parquet(tmp_path / d / "results.parquet") for d in "ac")
    assert not a["value"].equals(c["value"])


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    run(compose_cfg(TINY), out_dir=tmp_path / "whole")
    original = _Trainer._save_checkpoint

    def save_then_die(self):
        original(self)
        if self.step == 3:
            raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(_Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(TINY), out_dir=tmp_path / "killed")
    monkeypatch.setattr(_Trainer, "_save_checkpoint", original)
    model_dir = next((tmp_path / "killed" / "models").iterdir())
    assert (model_dir / "ckpt" / "latest").read_text() == "step_000003"
    run(compose_cfg(TINY), out_dir=tmp_path / "killed")
    info = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert info["models"][0]["resumed_from"] == 3
    whole, killed = final_metrics(tmp_path / "whole"), final_metrics(tmp_path / "killed")
    pd.testing.assert_frame_equal(whole[0], killed[0], check_exact=True)
    assert whole[1] == killed[1]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"train": 0}
    real_run_loop = halting.run_loop

    def poisoned(model, tokens, controller, **kw):
        out = real_run_loop(model, tokens, controller, **kw)
        if model.training:
            calls["train"] += 1
            if calls["train"] == 5:
                out.logits = out.logits * float("nan")
        return out

    monkeypatch.setattr(halting, "run_loop", poisoned)
    with pytest.raises(TrainingFailed, match="at step 5") as err:
        run(compose_cfg(TINY), out_dir=tmp_path)
    assert err.value.step == 5 and err.value.checkpoint == 3
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] == 5
    model_dir = next((tmp_path / "models").iterdir())
    assert json.loads((model_dir / "status.json").read_text())["status"] == "failed"
    assert (model_dir / "ckpt" / "step_000003" / "model.safetensors").exists()


def test_random_depth_and_learned_objective_train(tmp_path):
    plan, valid = first_plan([*TINY, "train.random_depth=true", "train.grad_steps=2"])
    result = train_model(plan, valid.task, valid.cfg["train"], tmp_path / "rd", seed=0)
    assert result.history[-1]["step"] == 8
    assert torch.isfinite(torch.tensor(result.history[-1]["val_loss"]))
    plan, valid = first_plan([*TINY, "controller=pondernet", "study.max_loops=3"])
    assert plan.objective == "pondernet" and plan.loops == 3
    result = train_model(plan, valid.task, valid.cfg["train"], tmp_path / "pn", seed=0)
    assert (tmp_path / "pn" / "model.safetensors").exists()
    assert result.history[-1]["val_mean_loops"] <= 3


def test_learned_halting_gradient_reaches_the_halt_head(tmp_path):
    plan, valid = first_plan([*TINY, "controller=ouro_gate", "train.steps=1"])
    trainer = _Trainer(plan, valid.task, valid.cfg["train"], tmp_path, 0,
                       __import__("experiments.train", fromlist=["DistInfo"]).DistInfo(),
                       torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer._train_step()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert any("halt" in n for n in changed), sorted(changed)


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_matches_uninterrupted(tmp_path):
    args = [*TINY, "train.steps=60", "train.checkpoint_every=5", "train.eval_every=20"]
    cmd = [sys.executable, "-m", "experiments", *args, f"hydra.run.dir={tmp_path}/hydra"]
    whole = subprocess.run([*cmd, f"out_dir={tmp_path / 'whole'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"out_dir={killed_dir}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(killed_dir.glob("models/*/ckpt/latest")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run([*cmd, f"out_dir={killed_dir}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    info = json.loads((killed_dir / "run.json").read_text())
    assert info["models"][0]["resumed_from"] is not None
    pd.testing.assert_frame_equal(final_metrics(tmp_path / "whole")[0],
                                  final_metrics(killed_dir)[0], check_exact=True)


def test_reloading_a_finished_model_builds_no_optimizer(tmp_path):
    """The study's main process reloads every trained model; the optimizer (whose first build
    imports torch._dynamo) is built only when training runs (issue 14), with the same weights."""
    from experiments.train import DistInfo

    plan, valid = first_plan(TINY)
    trained = train_model(plan, valid.task, valid.cfg["train"], tmp_path, seed=0)
    trainer = _Trainer(plan, valid.task, valid.cfg["train"], tmp_path, 0, DistInfo(),
                       torch.device("cpu"))
    reloaded = trainer.load_finished()
    assert trainer._optimizer is None and trainer._scheduler is None
    for (name, a), (_, b) in zip(trained.model.state_dict().items(),
                                 reloaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert trainer.optimizer is trainer.optimizer and trainer._scheduler is not None
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        valid.cfg["train"]["lr"] * lr_factor(0, valid.cfg["train"]["steps"],
                                             valid.cfg["train"]["warmup_steps"],
                                             valid.cfg["train"]["min_lr_ratio"]))


def test_foreach_adamw_trains_the_weights_of_the_per_tensor_loop(tmp_path, monkeypatch):
    """The trainer's AdamW runs foreach (one call per operation over all parameters, issue 14):
    the same arithmetic as torch's per-tensor loop, so the trained weights are bit-identical."""
    plan, valid = first_plan([*TINY, "train.steps=6", "train.eval_every=4"])
    fast = train_model(plan, valid.task, valid.cfg["train"], tmp_path / "foreach", seed=0)
    built = []
    adamw = torch.optim.AdamW

    def per_tensor(*args, **kwargs):
        built.append(kwargs.pop("foreach", None))
        return adamw(*args, foreach=False, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", per_tensor)
    slow = train_model(plan, valid.task, valid.cfg["train"], tmp_path / "loop", seed=0)
    assert built == [True]  # the trainer asked for foreach; this run used the loop instead
    for (name, a), (_, b) in zip(fast.model.state_dict().items(),
                                 slow.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert fast.history == slow.history and len(fast.history) == 2  # validated at 4, 6
