"""``study_ab``: the default study of this tree against a baseline tree, side by side (issue 14).

Runs ``python -m experiments`` with no overrides (the default study, what ``make study`` runs)
alternately from this tree and from a baseline checkout (``LOOPSCOPE_BASELINE``, default
``/work/wt/baseline`` = commit 69883d8), each in a fresh directory with ``out_dir`` set, for
``--reps`` pairs (default 1: each study is minutes long), in the order B A B A ... so load drifts
hit both. The row is the per-pair wall-time ratio this / baseline (target <= 0.5).

The results tables of the two runs of each pair are compared on their key columns: rows of
``results.parquet`` whose values differ are counted per metric with the largest absolute
difference (the float32 per-loop diagnostics differ from float64 by rounding only; every other
metric must be identical), and ``samples.parquet`` / ``traces.parquet`` must be equal. The
comparison is in the row's ``raw`` and ``note``.

Command (about 7 minutes per pair on an idle 2-core machine)::

    LOOPSCOPE_BASELINE=/work/wt/baseline python -m experiments.bench --only study_ab --reps 1

``LOOPSCOPE_AB_OVERRIDES="train.steps=60 eval.batch_size=256"`` adds overrides to both runs (a
smaller study for a loaded machine; the row then no longer measures the default study).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.bench.core import BENCHMARKS, BenchConfig, Row, make_row

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASELINE = "/work/wt/baseline"
KEYS = {"results": ["run", "split", "controller", "budget", "loop", "metric"],
        "samples": ["run", "split", "controller", "budget", "sample"],
        "traces": ["run", "split", "controller", "budget", "sample", "token", "loop", "metric"]}
TIMEOUT_S = int(os.environ.get("LOOPSCOPE_AB_TIMEOUT", "3600"))


def run_study(tree: Path, out: Path) -> float:
    """Wall seconds of the default study run from source tree ``tree`` into ``out``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    extra = os.environ.get("LOOPSCOPE_AB_OVERRIDES", "").split()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "experiments", f"out_dir={out}",
                           f"hydra.run.dir={out}_hydra", "train.progress=false", *extra],
                          cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"the study from {tree} exited {done.returncode}: {tail[0]}")
    return wall


def compare_tables(new: Path, old: Path) -> dict[str, Any]:
    """Per table: rows, and for ``results`` the metrics whose values differ (max |diff|)."""
    report: dict[str, Any] = {}
    for name, keys in KEYS.items():
        a, b = pd.read_parquet(new / f"{name}.parquet"), pd.read_parquet(old / f"{name}.parquet")
        merged = pd.merge(a, b, on=keys, how="outer", suffixes=("_new", "_old"), indicator=True)
        entry: dict[str, Any] = {"rows_new": len(a), "rows_old": len(b),
                                 "unmatched": int((merged["_merge"] != "both").sum())}
        both = merged[merged["_merge"] == "both"]
        columns = [c[:-4] for c in both.columns if c.endswith("_new")]
        differing = {}
        for column in columns:
            x, y = both[f"{column}_new"], both[f"{column}_old"]
            same = (x == y) | (x.isna() & y.isna())
            if not same.all():
                diff = pd.to_numeric(x, errors="coerce") - pd.to_numeric(y, errors="coerce")
                by = both[~same].groupby("metric") if "metric" in both else None
                differing[column] = {
                    "rows": int((~same).sum()),
                    "max_abs_diff": float(np.nanmax(np.abs(diff[~same]))),
                    "metrics": sorted(set(by.groups)) if by is not None else []}
        entry["differing"] = differing
        report[name] = entry
    return report


@BENCHMARKS.register("study_ab")
def bench_study_ab(cfg: BenchConfig) -> list[Row]:
    """Default study wall time, this tree / the baseline tree, alternating pairs."""
    baseline = Path(os.environ.get("LOOPSCOPE_BASELINE", DEFAULT_BASELINE))
    if not (baseline / "experiments").is_dir():
        raise RuntimeError(f"no baseline tree at {baseline}: create it with `git worktree add "
                           f"{baseline} 69883d8` or set LOOPSCOPE_BASELINE")
    pairs = max(1, cfg.reps or 1)
    walls: dict[str, list[float]] = {"this": [], "baseline": []}
    comparisons = []
    with tempfile.TemporaryDirectory(prefix="loopscope-ab-") as work:
        for pair in range(pairs):
            outs = {}
            for name, tree in (("baseline", baseline), ("this", REPO_ROOT)):
                outs[name] = Path(work) / f"{name}{pair}"
                walls[name].append(run_study(tree, outs[name]))
            comparisons.append(compare_tables(outs["this"], outs["baseline"]))
    ratio = [a / b for a, b in zip(walls["this"], walls["baseline"], strict=True)]
    differing = {name: sorted(entry["differing"]) for name, entry in comparisons[0].items()}
    note = (f"this {np.median(walls['this']):.0f} s vs baseline "
            f"{np.median(walls['baseline']):.0f} s; differing columns {differing}")
    return [make_row("study_ab", "default study wall time, this tree / baseline "
                     f"({baseline.name})", ratio, "<= 0.5",
                     raw={"seconds": walls, "tables": comparisons},
                     config={"baseline": str(baseline), "pairs": pairs}, note=note)]
