"""Faults (issue #7): nothing is lost.

* a NaN loss in training stops the run naming the step, keeps the last good checkpoint untouched,
  records the failure in ``status.json`` and writes no results;
* a trajectory that diverges during evaluation is a verdict (``diverging``), not a crash, and every
  other sample's rows are exactly those of a clean evaluation;
* a corrupt checkpoint or one written for another model config stops a resumed run with one line
  (exit status 2) and nothing on disk changes;
* every results file, figure and checkpoint goes through a temp-file-and-rename write.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from _app_helpers import ROOT, TINY, compose_cfg

import halting
from experiments.cli.app import main
from experiments.config.validate import validate_config
from experiments.errors import CheckpointError
from experiments.evaluate import evaluate_model
from experiments.results import atomic_write_text
from experiments.study import plan_models, run
from experiments.train import TrainingFailed, TrainResult
from experiments.train.trainer import _Trainer
from models import build_model


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".lock")}


def _run_cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``loopscope ARGV`` in-process (Hydra included); returns (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["loopscope"])
    try:
        main(argv)
        code = 0
    except SystemExit as exited:
        code = exited.code
    return code, capsys.readouterr().err


# -- NaN loss in training ------------------------------------------------------------------------
def _poison_training_at(call: int, monkeypatch) -> None:
    """Make the ``call``-th training forward return NaN logits (in-process, no test knob ships)."""
    seen = {"train": 0}
    real_run_loop = halting.run_loop

    def poisoned(model, tokens, controller, **kw):
        out = real_run_loop(model, tokens, controller, **kw)
        if model.training:
            seen["train"] += 1
            if seen["train"] == call:
                out.logits = out.logits * float("nan")
        return out

    monkeypatch.setattr(halting, "run_loop", poisoned)


def test_nan_loss_stops_the_cli_run_names_the_step_and_keeps_the_checkpoint(
        tmp_path, monkeypatch, capsys):
    checkpoint_bytes = {}
    original = _Trainer._save_checkpoint

    def remember(self):
        original(self)
        ckpt = self.store.ckpt_root / f"step_{self.step:06d}"
        checkpoint_bytes.update(_snapshot(ckpt))
        checkpoint_bytes["_dir"] = ckpt

    monkeypatch.setattr(_Trainer, "_save_checkpoint", remember)
    _poison_training_at(7, monkeypatch)
    out = tmp_path / "run"
    code, err = _run_cli([*TINY, f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                         monkeypatch, capsys)
    assert code == 1, err
    assert "Traceback" not in err
    assert "at step 7" in err and "step 6" in err  # the failing step and the kept checkpoint
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] == 7 and status["checkpoint"] == 6
    ckpt = checkpoint_bytes.pop("_dir")
    assert ckpt.name == "step_000006"
    kept = {name: data for name, (data, _) in _snapshot(ckpt).items()}
    assert kept == {name: data for name, (data, _) in checkpoint_bytes.items()}
    assert not (out / "results.parquet").exists()  # no silent continuation into evaluation


def test_nan_at_the_first_step_says_no_checkpoint_was_written(tmp_path, monkeypatch):
    _poison_training_at(1, monkeypatch)
    with pytest.raises(TrainingFailed, match="at step 1.*no checkpoint") as err:
        run(compose_cfg(TINY), out_dir=tmp_path)
    assert err.value.step == 1 and err.value.checkpoint is None
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


# -- a diverging trajectory during evaluation ----------------------------------------------------
def _trained(poison_sample: int | None):
    valid = validate_config(compose_cfg(TINY))
    plan = plan_models(valid.cfg, valid)[0]
    torch.manual_seed(0)
    model = build_model(dict(plan.model_fields))
    if poison_sample is not None:
        real_step = model.step

        def step(z, ctx, k):  # NaN into one sample's state at loop 3 of every full-batch run
            out = real_step(z, ctx, k)
            if k == 2 and out.shape[0] > poison_sample:
                out = out.clone()
                out[poison_sample] = float("nan")
            return out

        model.step = step
    eval_cfg = dict(valid.cfg["eval"], splits=["val"], attention_samples=4,
                    spectral_samples=4)
    return TrainResult(plan, model, halting.build_controller("fixed")), valid.task, eval_cfg


def test_diverging_sample_is_a_verdict_and_never_contaminates_the_others():
    clean = evaluate_model(*_trained(None), seed=0, device=torch.device("cpu")).frames()
    bad = evaluate_model(*_trained(1), seed=0, device=torch.device("cpu")).frames()
    samples = bad["samples"]
    poisoned = samples[samples["sample"] == 1]
    assert len(poisoned) > 0 and set(poisoned["label"]) == {"diverging"}
    assert not poisoned["correct"].any()
    others = samples[samples["sample"] != 1].reset_index(drop=True)
    expected = clean["samples"][clean["samples"]["sample"] != 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(others, expected, check_exact=True)
    assert others["spectral_radius"].notna().any()
    results = bad["results"]
    assert results["value"].notna().all(), results[results["value"].isna()]
    shares = results[(results["metric"] == "share_diverging") & (results["controller"] == "fixed")]
    assert (shares["value"] > 0).all() and len(shares) > 0
    traces = bad["traces"]
    assert not traces[traces["sample"] == 0].empty


# -- corrupt or mismatched checkpoint on resume ---------------------------------------------------
def _killed_after_first_checkpoint(out: Path, monkeypatch, overrides: list[str] = TINY) -> Path:
    original = _Trainer._save_checkpoint

    def save_then_die(self):
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(_Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(overrides), out_dir=out)
    monkeypatch.setattr(_Trainer, "_save_checkpoint", original)
    return next(out.glob("models/*/ckpt/step_*"))


@pytest.mark.parametrize("damage, overrides, words", [
    ("truncate state", [], ["state.pt", "truncated or corrupt", "out_dir"]),
    ("truncate weights", [], ["model.safetensors", "truncated or corrupt", "out_dir"]),
    # a changed model config (formerly case "none" here) is now refused before any checkpoint is
    # read, by the run directory's fingerprint: tests/robustness/test_integrity.py
])
def test_resume_from_a_bad_checkpoint_is_one_line_exit_2_nothing_changed(
        damage, overrides, words, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    ckpt = _killed_after_first_checkpoint(out, monkeypatch)
    if damage != "none":
        target = ckpt / ("state.pt" if damage == "truncate state" else "model.safetensors")
        target.write_bytes(target.read_bytes()[:100])
    before = _snapshot(out)
    del before["status.json"]  # the run's own status is the one file that records the failure
    with pytest.raises(CheckpointError):
        run(compose_cfg([*TINY, *overrides]), out_dir=out)
    after = _snapshot(out)
    status = json.loads(after.pop("status.json")[0])
    assert status["status"] == "failed" and words[0] in status["message"]
    assert after == before
    code, err = _run_cli([*TINY, *overrides, f"out_dir={out}",
                          f"hydra.run.dir={tmp_path / 'hydra'}"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loopscope: error: "), err
    assert all(word in lines[0] for word in words), lines[0]
    after = _snapshot(out)
    del after["status.json"]
    assert after == before


# -- atomic writes --------------------------------------------------------------------------------
WRITERS = {"to_parquet", "savefig", "save_file", "save", "write_text", "write_bytes", "dump",
           "to_csv", "to_json", "write"}


def _write_calls(tree: ast.AST):
    """Yield (call, enclosing lambda/function names) for every call that writes a file."""
    def visit(node: ast.AST, stack: list[ast.AST]):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in WRITERS and not (name == "save" and "torch" not in ast.unparse(func)):
                yield node, stack
            if name == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                      and set(a.value) & set("wax") for a in node.args[1:]):
                yield node, stack
        for child in ast.iter_child_nodes(node):
            inner = [*stack, node] if isinstance(node, (ast.Lambda, ast.FunctionDef,
                                                        ast.Call)) else stack
            yield from visit(child, inner)

    yield from visit(tree, [])


def _is_atomic(call: ast.Call, stack: list[ast.AST], source: str) -> bool:
    """Inside an ``atomic_*`` helper or a lambda handed to one, or a write into a temp / staging
    path of a module that moves it into place with ``os.replace``."""
    for node in stack:
        if isinstance(node, ast.FunctionDef) and "atomic" in node.name:
            return True
        if isinstance(node, ast.Call) and "atomic" in ast.unparse(node.func):
            return True
    target = " ".join(ast.unparse(arg) for arg in [call.func, *call.args])
    if "devnull" in target:
        return True
    if ast.unparse(call.args[0]) == "buffer" if call.args else False:
        return "io.BytesIO()" in source  # an in-memory buffer, written to disk atomically later
    return "os.replace" in source and any(w in target for w in ("tmp", "temp", "staging"))


def test_every_file_write_is_atomic():
    offenders = []
    for package in ("experiments", "models", "fixedpoint", "halting"):
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            for call, stack in _write_calls(ast.parse(source)):
                if not _is_atomic(call, stack, source):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} {ast.unparse(call)}")
    assert not offenders, "non-atomic writes:\n" + "\n".join(offenders)


def test_the_atomic_write_check_tells_plain_writes_from_atomic_ones():
    plain = "import torch\ndef f(df, fig, p):\n    df.to_parquet(p)\n    fig.savefig(p)\n" \
        "    torch.save({}, p)\n    open(p, 'w')\n    p.write_text('x')\n"
    found = [_is_atomic(call, stack, plain) for call, stack in _write_calls(ast.parse(plain))]
    assert found == [False] * 5
    atomic = "def f(df, p):\n    atomic_write(p, lambda tmp: df.to_parquet(tmp))\n"
    assert [_is_atomic(c, st, atomic) for c, st in _write_calls(ast.parse(atomic))] == [True]


def test_a_failing_writer_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def explode(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    from experiments.results import atomic_write

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, explode)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp left behind


# -- a controller's own parameters and random state are trained and checkpointed ----------------
def test_q_halt_head_is_in_the_optimiser_and_moves():
    """``q_halt`` creates its Q-head in ``bind``: the trainer binds before building the optimiser
    (else the head is silently never trained) and before loading a checkpoint."""
    from experiments.train import DistInfo

    valid = validate_config(compose_cfg([*TINY, "controller=q_halt", "study.max_loops=3"]))
    plan = plan_models(valid.cfg, valid)[0]
    trainer = _Trainer(plan, valid.task, valid.cfg["train"], Path("unused"), 0, DistInfo(),
                       torch.device("cpu"))
    head = list(trainer.controller.parameters())
    assert head, "q_halt has no parameters after bind"
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in head)
    before = [p.detach().clone() for p in head]
    trainer._train_step()
    assert any(not torch.equal(a, p) for a, p in zip(before, head)), "Q-head did not move"


@pytest.mark.parametrize("controller", [
    ["controller=q_halt"],  # Q-head parameters + exploration generator
    ["controller=pondernet", "controller.inference=sample"],  # sampling generator
])
def test_learned_controller_resumes_bit_identically(controller, tmp_path, monkeypatch):
    overrides = [*TINY, *controller, "study.max_loops=3"]
    run(compose_cfg(overrides), out_dir=tmp_path / "whole")
    _killed_after_first_checkpoint(tmp_path / "killed", monkeypatch, overrides)
    run(compose_cfg(overrides), out_dir=tmp_path / "killed")
    info = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert info["models"][0]["resumed_from"] == 3
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "whole" / "results.parquet"),
                                  pd.read_parquet(tmp_path / "killed" / "results.parquet"),
                                  check_exact=True)
