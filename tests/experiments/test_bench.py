"""Tests of ``loopscope-bench``: the harness and the CLI contract, never the targets.

Performance numbers are not asserted (timed unit tests are meaningless on a shared machine);
these tests check that the table and ``bench.json`` carry every column and field, that the
measurement helpers measure what they claim, and that bad input gives a clear error.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.registry import Registry
from experiments.bench import solvers as solver_bench
from experiments.bench import suite as bench
from experiments.bench.core import (
    BenchConfig,
    Row,
    alternate,
    loglog_slope,
    make_row,
    meets,
    peak_memory,
    ratios,
    saved_tensor_bytes,
)

ROW_FIELDS = {"benchmark", "compared", "median", "low", "high", "target", "status", "reps", "raw",
              "config", "note"}


def _threads() -> list[str]:
    return ["--threads", str(torch.get_num_threads())]  # leave the test process's setting alone


def test_quick_overhead_prints_table_and_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = bench.main(["--quick", "--only", "overhead", "--reps", "2", "--out", str(out),
                         "--device", "cpu", *_threads()])
    printed = capsys.readouterr().out
    assert status == 0
    header = next(line for line in printed.splitlines() if line.startswith("| benchmark"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == list(bench.COLUMNS)
    body = [line for line in printed.splitlines() if line.startswith("| overhead")]
    assert len(body) == 3
    for line in body:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(bench.COLUMNS)
        assert (cells[4], cells[5]) in (("—", "info"), ("<= 1.05", "pass"), ("<= 1.05", "fail"),
                                        ("<= 1.3", "pass"), ("<= 1.3", "fail"))
        float(cells[2])  # the median ratio is a number
    rows = json.loads(out.read_text())
    assert len(rows) == 3
    assert [row["status"] for row in rows][0] == "info"
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert row["benchmark"] == "overhead"
        assert len(row["reps"]) == 3 * 2 and all(r > 0 for r in row["reps"])
        assert row["low"] <= row["median"] <= row["high"]
        assert set(row["raw"]["seconds"]) == {"bare", "run_loop", "run_loop_record", "bare_again"}
        assert row["config"]["run"]["quick"] is True
        assert row["config"]["run"]["device"] == "cpu"
        assert row["config"]["arch"] == "parallel_loop"


def test_unknown_benchmark_name_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--only", "overhead,nope"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "nope" in message and "overhead" in message and "verdicts" in message


def test_module_entry_point_runs_main():
    done = subprocess.run([sys.executable, "-m", "experiments.bench", "--only", "nope"],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2
    assert "unknown benchmark(s) ['nope']" in done.stderr and "known: overhead" in done.stderr


def test_quick_skips_study_unless_named():
    parser = bench.argparse.ArgumentParser()
    assert "study" not in bench.select(None, True, parser)
    assert bench.select(None, False, parser) == list(bench.SUITE)
    assert bench.select("study,overhead", True, parser) == ["overhead", "study"]


def test_a_raising_benchmark_leaves_an_error_row_and_the_suite_goes_on(monkeypatch):
    fake: Registry = Registry("benchmark")

    def broken(cfg: BenchConfig) -> list[Row]:
        raise RuntimeError("solver exploded")

    fake.register("broken", broken)
    fake.register("fine", lambda cfg: [make_row("fine", "a / b", [0.5, 0.7, 0.6], "<= 1")])
    monkeypatch.setattr(bench, "BENCHMARKS", fake)
    rows = bench.run_suite(["broken", "fine"], BenchConfig(quick=True))
    assert [r.status for r in rows] == ["error", "pass"]
    assert "solver exploded" in rows[0].note
    assert "error: RuntimeError: solver exploded" in bench.format_table(rows)
    assert rows[1].median == pytest.approx(0.6) and (rows[1].low, rows[1].high) == (0.5, 0.7)
    assert rows[1].config["run"]["quick"] is True


def test_targets_are_checked_on_the_median():
    assert meets(1.04, "<= 1.05") and not meets(1.06, "<= 1.05")
    assert meets(0.96, ">= 0.95") and not meets(0.9, ">= 0.95")
    assert not meets(1.0, "< 1") and not meets(math.nan, "<= 1")
    assert make_row("x", "a / b", [0.9, 2.0, 1.0], "<= 1.0").status == "pass"
    assert make_row("x", "a / b", [1.2], None).status == "info"
    with pytest.raises(ValueError, match="target"):
        meets(1.0, "about 1")


def test_alternate_times_each_case_interleaved():
    calls: list[str] = []
    cases = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = alternate(cases, BenchConfig(quick=True, warmup=1), reps=3)
    assert set(times) == {"a", "b"} and all(len(v) == 3 for v in times.values())
    timed = calls[2:]  # after one warm-up call each
    inner = len(timed) // 6
    assert timed == (["a"] * inner + ["b"] * inner) * 3  # A B A B A B
    assert len(ratios(times, "a", "b")) == 3


def test_loglog_slope_recovers_a_power_law():
    sizes = [1, 2, 4, 8, 16]
    assert loglog_slope(sizes, [3.0 * s**1.5 for s in sizes]) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="pairs"):
        loglog_slope([1], [1.0])


def test_memory_probes_see_a_known_allocation():
    numel = 1 << 20  # 4 MiB of float32

    def allocate() -> float:
        block = torch.ones(numel)
        return float(block.sum())

    peak = peak_memory(allocate, torch.device("cpu"))
    assert 4 * numel <= peak < 3 * 4 * numel
    weight = torch.randn(256, 256, requires_grad=True)

    def forward() -> None:
        inputs = torch.randn(64, 256, requires_grad=True)
        (inputs @ weight).tanh().sum().backward()

    saved = saved_tensor_bytes(forward)
    # mm saves both operands (64x256, 256x256) when both need grad; tanh its output (64x256).
    assert saved == 4 * (64 * 256 + 256 * 256 + 64 * 256)


@pytest.mark.slow  # ~12 s: eight decode comparisons, each generating 32 tokens per repetition
def test_quick_decode_rows_include_the_wider_model_and_every_comparison(tmp_path):
    out = tmp_path / "bench.json"
    status = bench.main(["--quick", "--only", "decode", "--reps", "1", "--out", str(out),
                         "--device", "cpu", *_threads()])
    assert status == 0
    rows = {row["compared"]: row for row in json.loads(out.read_text())}
    assert len(rows) == 7
    wide = rows["PLT parallel decode time/token: R=2 / R=1 at d_model 128"]
    assert wide["config"]["d_model"] == 128 and wide["status"] == "info"
    narrow = rows["PLT parallel decode time/token: R=2 / R=1"]
    assert narrow["config"]["d_model"] == 64 and narrow["target"] == "<= 1.3"
    assert all(row["median"] > 0 for row in rows.values())


def _small_layer(stop_mode: str) -> solver_bench.Problem:
    problem = solver_bench.layer_problem(torch.device("cpu"), seed=3, batch=6, dim=16)
    problem.stop_mode = stop_mode
    return problem


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_solver_calibration_meets_the_true_tolerance_for_both_libraries(stop_mode):
    problem = _small_layer(stop_mode)
    for runner, native in ((functools.partial(solver_bench.ours, "anderson"), True),
                           (functools.partial(solver_bench.theirs, "fixed_point_iter"), False)):
        entry = solver_bench.calibrate(runner, problem, native)
        assert entry["converged"] and entry["tol factor"] is not None
        # the returned z, re-run at the calibrated tolerance, meets the true tolerance
        f = problem.f if native else problem.plain
        z = runner(problem, f, tol=problem.tol * entry["tol factor"])()
        assert float(problem.residual(z).max()) <= problem.tol * (1 + 1e-3)
        assert entry["evaluations"] >= 1


def test_solver_calibration_marks_an_unreachable_tolerance():
    problem = _small_layer("rel")

    def two_steps(problem, f, *, tol):  # ignores tol: always stops after 2 steps
        return solver_bench.ours("fixed_point_iter", problem, f, tol=1e-30, max_iter=2)

    entry = solver_bench.calibrate(two_steps, problem, True)
    assert not entry["converged"] and entry["tol factor"] is None
    assert entry["achieved"] > problem.tol
    assert entry["evaluations"] == 2


def test_true_residual_is_relative_to_the_image():
    problem = _small_layer("rel")
    z = torch.randn_like(problem.inject)
    fz = problem.plain(z).double()
    expected = (fz - z.double()).norm(dim=1) / fz.norm(dim=1)
    torch.testing.assert_close(problem.residual(z), expected)
