"""Resume and determinism (issue #7).

* A single run killed with SIGKILL after a checkpoint exists continues from it when re-run in the
  same directory, and ends with exactly the results of an uninterrupted run.
* A multirun killed mid-sweep, re-run in the same sweep directory, skips the finished jobs and
  trains only the rest; ``collect`` on the partial sweep works and names the missing jobs.
* Same config and seed -> identical results; each multirun job's seed comes from the base seed
  and the job number (two jobs differ, the same job re-run is identical).
"""

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
from _app_helpers import compose_cfg

from experiments.results import collect
from experiments.study import job_seed, run

ROOT = Path(__file__).resolve().parents[2]
# one tiny fixed-loop model; long enough (~3 s of training) to be killed mid-way
TINY = ["experiment=smoke", "study.train_loops=[2]", "~study.learned.ouro_gate",
        "~eval.controllers.solver", "eval.figures=false", "eval.attention_samples=0",
        "eval.splits=[val]", "train.steps=150", "train.checkpoint_every=10",
        "train.eval_every=50"]


def _loopscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments", *TINY, *args]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (fails if it finished first)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline, "timed out waiting to kill the run"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


def _resumed_from(out: Path) -> list:
    return [m["resumed_from"] for m in json.loads((out / "run.json").read_text())["models"]]


def test_sigkilled_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(_loopscope(f"out_dir={whole}"), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.Popen(_loopscope(f"out_dir={killed}"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: any(killed.glob("models/*/ckpt/latest")))
    assert not (killed / "results.parquet").exists()
    status = json.loads((killed / "status.json").read_text())
    assert status["status"] == "running"  # what a killed run leaves behind
    again = subprocess.run(_loopscope(f"out_dir={killed}"), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = _resumed_from(killed)[0]
    assert resumed is not None and 10 <= resumed < 150
    pd.testing.assert_frame_equal(_results(whole), _results(killed), check_exact=True)
    history = [json.loads((d / "run.json").read_text())["models"][0]["final"]
               for d in (whole, killed)]
    assert history[0] == history[1]


@pytest.mark.slow  # ~20 s; the fast suite covers collect's bookkeeping below and the skip of
# finished jobs in tests/experiments/test_app.py
def test_killed_multirun_skips_finished_jobs_and_redoes_only_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    # the jobs differ only in a reporting knob, so their seeds differ only through the job number
    cmd = [*_loopscope("eval.trace_samples=2,3,4", f"hydra.sweep.dir={sweep}"), "-m"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the basic launcher runs the jobs in order: kill job 1 once it has a checkpoint
    _kill_when(proc, lambda: any((sweep / "1").glob("models/*/ckpt/latest")), timeout=240)
    finished_0 = (sweep / "0" / "results.parquet").stat().st_mtime_ns
    assert json.loads((sweep / "0" / "status.json").read_text())["status"] == "finished"
    partial, missing = collect(sweep)
    assert set(partial["job"]) == {"0"} and len(partial) > 0
    assert missing == ["1", "2"]  # job 1 was killed, job 2 never started
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already finished; skipped") == 1
    assert (sweep / "0" / "results.parquet").stat().st_mtime_ns == finished_0  # not redone
    assert _resumed_from(sweep / "1")[0] is not None  # continued from its checkpoint
    assert _resumed_from(sweep / "2") == [None]  # trained from scratch
    frame, missing = collect(sweep)
    assert missing == [] and set(frame["job"]) == {"0", "1", "2"}
    seeds = [json.loads((sweep / str(n) / "status.json").read_text())["seed"] for n in range(3)]
    assert seeds == [job_seed(0, n) for n in range(3)] and len(set(seeds)) == 3


def test_collect_names_killed_and_never_started_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "1" / ".hydra").mkdir(parents=True)
    frame = pd.DataFrame({c: [0] for c in ("loop", "value")}).assign(metric="accuracy")
    frame.to_parquet(sweep / "0" / "results.parquet")
    (sweep / "1" / "results.parquet").write_bytes(b"PAR1 cut short")  # killed mid-write
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - experiment=smoke\n    - seed=0,1\n"
        "    - train.lr=0.1,0.2\n")
    collected, missing = collect(sweep)
    assert set(collected["job"]) == {"0"}
    assert missing == ["1", "2", "3"]  # 2 x 2 jobs: job 1 unreadable, jobs 2 and 3 never started


def test_same_config_and_seed_give_identical_results_and_job_seeds_differ(tmp_path):
    small = [*TINY, "train.steps=6", "train.checkpoint_every=3", "train.eval_every=3"]
    run(compose_cfg(small), out_dir=tmp_path / "a")
    run(compose_cfg(small), out_dir=tmp_path / "b")
    for table in ("results", "samples", "traces"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / f"{table}.parquet"),
                                      pd.read_parquet(tmp_path / "b" / f"{table}.parquet"),
                                      check_exact=True)
    run(compose_cfg([*small, f"seed={job_seed(0, 1)}"]), out_dir=tmp_path / "job1")
    assert not _results(tmp_path / "a")["value"].equals(_results(tmp_path / "job1")["value"])
    assert job_seed(0, 1) == job_seed(0, 1) != job_seed(0, 2) != job_seed(1, 1)
