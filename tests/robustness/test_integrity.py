"""Integrity of a run directory (issue 14): one config per directory, one run at a time, values
that used to crash after minutes refused up front, failures recorded, files that follow the umask,
``loopscope-plot`` / ``loopscope-diagnose`` that validate before they write or report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from _app_helpers import ROOT, TINY, compose_cfg

from experiments.cli.app import main
from experiments.results.rundir import FINGERPRINT_FILE, RunDirError, config_hash, run_lock
from experiments.study import run

TINY_FAST = [*TINY, "train.steps=3", "train.checkpoint_every=0", "train.eval_every=0",
             "eval.splits=[val]", "eval.batch_size=16", "eval.spectral_samples=0",
             "eval.trace_samples=0"]


def _cli(argv: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["loopscope"])
    try:
        main(argv)
        code = 0
    except SystemExit as exited:
        code = exited.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.strip()]


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".lock")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run(compose_cfg(TINY_FAST), out_dir=out)["status"] == "finished"
    return out


# -- fingerprint -----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    (["seed=1"], ["seed (0 -> 1)"]),
    (["train.lr=0.003"], ["train.lr (0.002 -> 0.003)"]),
    (["task=s5"], ["task.name ('parity' -> 's5')"]),
    (["model.d_model=64"], ["model.d_model (32 -> 64)"]),
])
def test_a_changed_config_in_a_finished_run_is_refused_naming_the_keys(
        change, words, finished, tmp_path, monkeypatch, capsys):
    before = _files(finished)
    code, lines = _cli([*TINY_FAST, *change, f"out_dir={finished}",
                        f"hydra.run.dir={tmp_path / 'hydra'}"], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loopscope: error: "), lines
    assert "another config" in lines[0] and all(w in lines[0] for w in words), lines[0]
    assert _files(finished) == before  # status stays "finished", nothing mixed in


def test_the_same_config_is_still_skipped_and_keys_that_change_no_result_are_ignored(finished):
    summary = run(compose_cfg([*TINY_FAST, "train.progress=false", "train.workers=2"]),
                  out_dir=finished)
    assert summary.get("skipped") is True


def test_a_changed_config_in_a_killed_run_is_not_resumed(tmp_path, monkeypatch):
    from experiments.train.trainer import _Trainer

    out = tmp_path / "run"
    monkeypatch.setattr(_Trainer, "_save_final", lambda self: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(TINY_FAST), out_dir=out)
    monkeypatch.undo()
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    with pytest.raises(RunDirError, match=r"seed \(0 -> 5\)"):
        run(compose_cfg([*TINY_FAST, "seed=5"]), out_dir=out)
    assert run(compose_cfg(TINY_FAST), out_dir=out)["status"] == "finished"  # same config resumes


def test_a_run_without_fingerprint_is_refused(finished, tmp_path):
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(finished, legacy)
    (legacy / FINGERPRINT_FILE).unlink()
    with pytest.raises(RunDirError, match="without fingerprint.json"):
        run(compose_cfg(TINY_FAST), out_dir=legacy)


def test_config_hash_depends_on_every_value_and_not_on_key_order():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1, "b": [1, 2]}) != config_hash({"a": 1, "b": [2, 1]})
    assert config_hash({"a": 1.0}) != config_hash({"a": 1.5})


# -- the lock --------------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from experiments.results.rundir import run_lock
    with run_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_concurrent_run_is_refused_and_a_dead_owner_is_taken_over(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, lines = _cli([*TINY_FAST, f"out_dir={out}", f"hydra.run.dir={tmp_path / 'h'}"],
                           monkeypatch, capsys)
        assert code == 2 and len(lines) == 1, lines
        assert "in use by another loopscope run" in lines[0] and f"pid {holder.pid}" in lines[0]
        assert not (out / "status.json").exists()  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((out / ".lock.owner").read_text())["pid"] == holder.pid  # left behind
    with run_lock(out):
        assert json.loads((out / ".lock.owner").read_text())["pid"] == os.getpid()
    assert f"stale lock of pid {holder.pid}" in capsys.readouterr().out
    assert not (out / ".lock.owner").exists()  # released on exit


def test_the_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    with run_lock(tmp_path), pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
        with run_lock(tmp_path):
            pass


# -- values that crashed after minutes are refused up front ---------------------------------------
@pytest.mark.parametrize("override, words", [
    ("eval.verdict_loops=2", ["eval.verdict_loops=2", ">= 7"]),
    ("eval.spectral_iters=1", ["eval.spectral_iters=1", ">= 2"]),
    ("task.max_len=5000", ["task.max_len=5000", "2048"]),
    (f"seed={10**23}", ["seed=", "4294967295"]),
    ("model.clp_a=inf", ["clp_a", "inf", "finite"]),
    ("model.rope_base=-1", ["rope_base", "-1", "> 1"]),  # was +model.rope_base (now a key)
    ("model=recurrent_depth model.init_scale=nan", ["init_scale", "nan", "finite"]),
    ("model.dropout=nan", ["dropout", "nan"]),
])
def test_values_that_crashed_late_are_refused_before_anything_is_written(
        override, words, tmp_path, monkeypatch, capsys):
    code, lines = _cli([*override.split(), f"out_dir={tmp_path / 'out'}"], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loopscope: error: "), lines
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "out").exists()


def test_a_failure_after_start_leaves_status_failed_with_the_reason(tmp_path, monkeypatch):
    import experiments.evaluate as evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(evaluate, "evaluate_model", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="exploded"):
        run(compose_cfg(TINY_FAST), out_dir=out)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and status["message"] == "evaluation exploded"
    assert status["error"] == "RuntimeError"


# -- out_dir ---------------------------------------------------------------------------------------
def test_out_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    target = tmp_path / "a_file"
    target.write_text("not a directory")
    code, lines = _cli([*TINY_FAST, f"out_dir={target}", f"hydra.run.dir={tmp_path / 'h'}"],
                       monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and "is an existing file" in lines[0], lines
    assert target.read_text() == "not a directory"


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        path = tmp_path / "ro"
        path.mkdir()
        path.chmod(0o555)
        return path
    for candidate in (Path("/sys"), Path("/proc")):  # root ignores permission bits
        try:
            (candidate / ".loopscope_probe").touch()
        except OSError:
            return candidate
    pytest.skip("no read-only directory available as root")


def test_read_only_out_dir_is_one_line(tmp_path, monkeypatch, capsys):
    target = _read_only_dir(tmp_path)
    code, lines = _cli([*TINY_FAST, f"out_dir={target}", f"hydra.run.dir={tmp_path / 'h'}"],
                       monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and "cannot be written" in lines[0], lines


# -- loopscope-plot and loopscope-diagnose ---------------------------------------------------------
def _plot(run_dir: Path, capsys) -> tuple[int, list[str]]:
    from experiments.cli.tools import plot_main

    try:
        plot_main([str(run_dir)])
        code = 0
    except SystemExit as exited:
        code = exited.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("table, words", [
    (pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}), ["not a loopscope table", "missing column"]),
    ("zero rows", ["no rows"]),
    ("all nan", ["no finite value"]),
])
def test_plot_refuses_bad_tables_and_leaves_figures_untouched(table, words, finished, tmp_path,
                                                              capsys):
    from experiments.results import write_parquet

    good = pd.read_parquet(finished / "results.parquet")
    if isinstance(table, str):
        table = good.iloc[:0] if table == "zero rows" else good.assign(value=float("nan"))
    run_dir = tmp_path / "run"
    write_parquet(table, run_dir / "results.parquet")
    old = run_dir / "figures" / "accuracy_vs_loops.png"
    old.parent.mkdir()
    old.write_bytes(b"old figure")
    code, lines = _plot(run_dir, capsys)
    assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert old.read_bytes() == b"old figure" and sorted(old.parent.iterdir()) == [old]
    assert not (run_dir / "report.md").exists()


def test_report_names_a_missing_samples_table(finished, tmp_path):
    import shutil

    from experiments.results.report import write_report

    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    assert "samples.parquet is missing" not in write_report(copy).read_text()
    (copy / "samples.parquet").unlink()
    assert "samples.parquet is missing" in write_report(copy).read_text()


def test_diagnose_refuses_integer_weights(finished, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from experiments.cli.tools import diagnose_main

    source = next(finished.glob("models/*/model.safetensors"))
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {k: v.to(torch.int64) for k, v in load_file(source).items()}
    bad = tmp_path / "model.safetensors"
    save_file(tensors, bad, metadata=metadata)
    with pytest.raises(SystemExit) as exited:
        diagnose_main([str(bad), "--task", "parity", "--batch", "4", "--loops", "8"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert "dtype torch.int64" in err and "expects torch.float32" in err, err


# -- file modes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(mask, mode, tmp_path):
    from experiments.results import atomic_write_text, write_parquet
    from models import build_model, save_model

    old = os.umask(mask)
    try:
        paths = [atomic_write_text(tmp_path / "a.txt", "x"),
                 write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "t.parquet"),
                 save_model(build_model("parallel_loop", d_model=8, n_heads=2, n_layers=1,
                                        vocab_size=4, max_seq_len=4, window=2),
                            tmp_path / "m.safetensors")]
    finally:
        os.umask(old)
    paths.append(tmp_path / "m.json")
    assert {p.name: p.stat().st_mode & 0o777 for p in paths} == {p.name: mode for p in paths}


def test_a_finished_run_has_no_private_files(finished):
    modes = {str(p.relative_to(finished)): p.stat().st_mode & 0o777
             for p in finished.rglob("*") if p.is_file()}
    mask = os.umask(0)
    os.umask(mask)
    assert all(m == 0o666 & ~mask for m in modes.values()), modes
