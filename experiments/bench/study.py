"""Benchmarks of the evaluation pipeline: ``verdicts`` and ``study``.

* ``verdicts``: ``fixedpoint.classify`` on the recorded trajectories of an evaluation (batch 256,
  64 tokens, 64 loops of ``parallel_loop`` at the default study's width) against the time to
  produce them (``run_loop(fixed(64), record=True)``), per sample and per token
  (``per_token=True`` folds the tokens into the batch: 256 x 64 trajectories).
* ``study``: the wall time of ``loopscope`` with no arguments (the real default study) run in a
  subprocess in a temporary directory, divided by the 300 s budget of issue #6. One repetition
  (it is minutes long); excluded from ``--quick``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.bench.core import BENCHMARKS, BenchConfig, Row, alternate, make_row, ratios
from experiments.bench.loop import inference, random_tokens, tiny_model
from fixedpoint import classify
from halting import build_controller, run_loop

STUDY_BUDGET_S = 300.0
REPO_ROOT = Path(__file__).resolve().parents[2]


@BENCHMARKS.register("verdicts")
def bench_verdicts(cfg: BenchConfig) -> list[Row]:
    """Classifying an evaluation's trajectories / producing them (per sample and per token)."""
    size = dict(batch=64, seq_len=32, loops=32) if cfg.quick else \
        dict(batch=256, seq_len=64, loops=64)
    d_model, arch = 64, "parallel_loop"
    model = tiny_model(arch, cfg, d_model=d_model, n_layers=2, vocab_size=64,
                       max_seq_len=size["seq_len"])
    tokens = random_tokens(64, size["batch"], size["seq_len"], cfg)
    fixed = build_controller("fixed", loops=size["loops"]).eval()
    produce = inference(
        cfg, lambda: run_loop(model, tokens, fixed, max_loops=size["loops"], record=True).states)
    states = produce()  # (K+1, B, T, D)
    times = alternate({
        "produce": produce,
        "classify": lambda: classify(states),
        "classify_per_token": lambda: classify(states, per_token=True),
    }, cfg, reps=3 if cfg.quick else 5)
    labels = classify(states).counts()
    config = {"arch": arch, "d_model": d_model, "n_layers": 2, **size,
              "states_shape": list(states.shape), "states_dtype": str(states.dtype)}
    raw = {"seconds": times, "labels": labels}
    return [
        make_row("verdicts", f"classify {size['batch']} trajectories ({size['loops']} loops x "
                 f"{size['seq_len']} tokens) / produce them", ratios(times, "classify", "produce"),
                 "<= 0.1", raw=raw, config=config, note=f"labels {labels}"),
        make_row("verdicts", f"classify per token ({size['batch'] * size['seq_len']} "
                 "trajectories) / produce them", ratios(times, "classify_per_token", "produce"),
                 "<= 0.1", raw=raw, config=config),
    ]


def _study_command() -> list[str]:
    script = Path(sys.executable).parent / "loopscope"
    return [str(script)] if script.exists() else [sys.executable, "-m", "experiments"]


@BENCHMARKS.register("study")
def bench_study(cfg: BenchConfig) -> list[Row]:
    """Wall time of ``loopscope`` with no arguments, in a subprocess, / 300 s."""
    command = _study_command()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="loopscope-study-") as workdir:
        start = time.perf_counter()
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=3 * STUDY_BUDGET_S)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {tail[0]}")
    return [make_row("study", "wall time of `loopscope` (no arguments) / 300 s",
                     [wall / STUDY_BUDGET_S], "<= 1", raw={"seconds": wall},
                     config={"command": command, "threads_env": os.environ.get(
                         "OMP_NUM_THREADS")},
                     note=f"{wall:.0f} s; one repetition; the study sets its own threads")]
