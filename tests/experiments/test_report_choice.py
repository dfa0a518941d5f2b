"""report.md's choice of loop count, on small synthetic results tables (not just its headings)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from experiments.results.report import build_report
from experiments.results.schema import RESULTS_COLUMNS, SAMPLES_COLUMNS


def _results(quality: dict[int, float], metric: str = "accuracy", arch: str = "toy",
             extra: list[dict] | None = None) -> pd.DataFrame:
    rows = []
    for loops, value in quality.items():
        base = {"run": f"{arch}-fixed-L{loops}", "task": "t", "arch": arch, "objective": "fixed",
                "train_loops": loops, "controller": "fixed", "budget": loops, "split": "val",
                "loop": loops}
        rows.append({**base, "metric": metric, "value": value})
        rows.append({**base, "metric": "flops_per_token", "value": 1e6 * loops})
        rows.append({**base, "metric": "loss", "value": 1.0 / loops})
    rows += extra or []
    return pd.DataFrame(rows)[RESULTS_COLUMNS]


def _samples(n: int, loops: list[int]) -> pd.DataFrame:
    rows = [{"run": f"toy-fixed-L{k}", "arch": "toy", "objective": "fixed", "train_loops": k,
             "controller": "fixed", "budget": k, "split": "val", "sample": i, "difficulty": 1,
             "depth": k, "expected_depth": math.nan, "correct": True, "loss": 0.1,
             "label": "converged", "period": 0,
             "rate": 0.5, "spectral_radius": math.nan} for k in loops for i in range(n)]
    return pd.DataFrame(rows)[SAMPLES_COLUMNS]


def _pick(report: str, arch: str = "toy") -> int:
    return int(re.search(rf"\*\*{arch}: (\d+) loop\(s\)\*\*", report).group(1))


WARNING = "It is the largest loop count trained"


def _report(results: pd.DataFrame, samples: pd.DataFrame | None = None,
            info: dict | None = None) -> str:
    return build_report(results, samples, info or {}, Path("/nonexistent"))


def test_pick_is_the_smallest_count_within_two_standard_errors_of_the_best():
    quality = {1: 0.50, 2: 0.80, 3: 0.82, 4: 0.83}
    # n = 400: s.e. of the best = sqrt(.83 * .17 / 400) = 0.0188, margin 0.0376 -> 2 is within
    report = _report(_results(quality), _samples(400, list(quality)))
    assert _pick(report) == 2
    assert WARNING not in report
    assert "accuracy within 0.038" in report


def test_more_evaluation_samples_narrow_the_margin():
    quality = {1: 0.50, 2: 0.80, 3: 0.82, 4: 0.83}
    # n = 10000: 2 s.e. = 0.0075 < 1 point, so the margin is 0.01 -> only 3 and 4 are within
    assert _pick(_report(_results(quality), _samples(10_000, list(quality)))) == 3


def test_largest_trained_count_warns_that_more_loops_may_pay():
    quality = {1: 0.50, 2: 0.60, 3: 0.70, 4: 0.90}
    report = _report(_results(quality), _samples(400, list(quality)))
    assert _pick(report) == 4
    assert WARNING in report


def test_bits_per_byte_pick_is_within_one_percent_of_the_lowest():
    quality = {1: 3.00, 2: 2.52, 3: 2.50, 4: 2.49}  # 1% of 2.49 = 0.0249 -> 2.52 is outside
    report = _report(_results(quality, metric="bits_per_byte"))
    assert _pick(report) == 3
    assert WARNING not in report


@pytest.mark.parametrize("declared,shown", [(True, True), (False, False)])
def test_nilpotent_note_follows_the_declared_property_not_the_name(declared, shown):
    base = {"run": "parallel_loop-fixed-L1", "task": "t", "arch": "parallel_loop",
            "objective": "fixed", "train_loops": 1, "controller": "fixed", "budget": 8,
            "split": "val"}
    extra = [{**base, "loop": k, "metric": "relative_residual", "value": 0.0} for k in (2, 3)]
    extra.append({**base, "loop": 8, "metric": "spectral_radius", "value": 0.0})
    results = _results({1: 0.9, 2: 0.9}, arch="parallel_loop", extra=extra)
    info = {"models": [{"run_id": "parallel_loop-fixed-L1", "arch": "parallel_loop",
                        "status": "finished", "nilpotent_step": declared, "final": None}]}
    report = _report(results, info=info)
    assert ("Jacobian is nilpotent" in report) is shown
