"""End-to-end runs of every experiment at smoke size, and the Hydra multirun path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from _app_helpers import compose_cfg

from experiments.figures import FIGURES
from experiments.results.schema import RESULTS_COLUMNS, SAMPLES_COLUMNS, TRACES_COLUMNS
from experiments.study import job_seed, run

ROOT = Path(__file__).resolve().parents[2]
# shrink any experiment to seconds (the smoke experiment is already this size)
SMALL = ["train.steps=4", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=2",
         "train.checkpoint_every=2", "train.progress=false", "train.eval_batch_size=8",
         "eval.batch_size=8", "eval.unroll=4", "eval.verdict_loops=8", "eval.spectral_samples=2",
         "eval.spectral_iters=4", "eval.attention_samples=2", "eval.trace_samples=2",
         "eval.figures=false"]  # figures are checked on the smoke run and by loopscope-plot
EXPERIMENTS = {
    "smoke": [],
    "default": SMALL + ["eval.budgets=[4]", "model.d_model=32", "model.n_layers=1"],
    "halting_comparison": SMALL + ["eval.budgets=[4]", "study.max_loops=4", "model.d_model=32"],
    "convergence_study": SMALL + ["eval.budgets=[4]", "study.train_loops=[2]"],
    "loopcoder": SMALL + ["eval.budgets=[4]", "study.train_loops=[1,2]", "task.seq_len=16",
                          "model.window=8", "model.d_model=32"],
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    summary = run(compose_cfg(["experiment=smoke"]), out_dir=out)
    return out, summary


def check_run_dir(out: Path, quality: str = "accuracy", figures: bool = True
                  ) -> dict[str, pd.DataFrame]:
    tables = {name: pd.read_parquet(out / f"{name}.parquet")
              for name in ("results", "traces", "samples")}
    assert list(tables["results"].columns) == RESULTS_COLUMNS
    assert list(tables["traces"].columns) == TRACES_COLUMNS
    assert list(tables["samples"].columns) == SAMPLES_COLUMNS
    for frame in tables.values():
        assert len(frame) > 0
    metrics = set(tables["results"]["metric"])
    assert {quality, "loss", "mean_loops", "flops_per_token", "relative_residual",
            "cos_prev", "share_converged"} <= metrics
    assert {"residual", "dist_to_final", "pc1", "pc2"} <= set(tables["traces"]["metric"])
    assert set(tables["samples"]["split"]) == {"val", "hard"}
    drawn = {p.stem for p in (out / "figures").glob("*.png")}
    assert drawn == (set(FIGURES) if figures else set()), f"missing: {set(FIGURES) - drawn}"
    report = (out / "report.md").read_text()
    for heading in ("## Quality vs loops", "## Unrolled past the training depth"):
        assert heading in report
    assert ("## Figures" in report) == figures
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    return tables


def test_smoke_writes_every_table_figure_and_the_report(smoke_run):
    out, summary = smoke_run
    assert summary["status"] == "finished"
    tables = check_run_dir(out)
    results = tables["results"]
    fixed = results[(results["controller"] == "fixed") & (results["metric"] == "accuracy")]
    # every model unrolled to >= 4x its training depth; both fixed depths trained
    for _, part in fixed.groupby("run"):
        assert part["budget"].max() >= 4 * part["train_loops"].iloc[0]
    assert set(results["objective"]) == {"fixed", "ouro_gate"}
    assert {"convergence_kl", "solver", "ouro_gate"} <= set(results["controller"])
    assert "## Sweet spot" in (out / "report.md").read_text()
    assert all((out / "models" / r / "model.safetensors").exists() for r in results["run"].unique())
    decode = json.loads((out / "decode.json").read_text())
    assert {r["run"] for r in decode["rows"]} == set(results["run"])  # every model timed
    for row in decode["rows"]:
        assert {"run", "arch", "loops", "batch", "new_tokens", "ms_per_token", "mean_depth",
                "device", "threads"} <= set(row)
        assert row["ms_per_token"] > 0 and 0 <= row["answer_accuracy"] <= 1
        if row["controller"] == "fixed":
            assert row["mean_depth"] == row["loops"]
        else:  # the learned model's own per-token exits, beside fixed at its cap
            assert 1 <= row["mean_depth"] <= row["loops"] and row["ratio_to_fixed_cap"] > 0
        assert row["batch"] == 8 and 1 < row["new_tokens"] <= 16  # never 1-token decodes
    assert min(decode["settings"]["prompt_lengths"]) >= 3  # parity: >= 2 bits and `=`
    assert {r["controller"] for r in decode["rows"]} == {"fixed", "ouro_gate"}
    assert "decode" not in " ".join(results.columns) + " ".join(set(results["metric"]))
    report = (out / "report.md").read_text()
    assert "## Decode latency vs FLOPs (wall-clock, machine-dependent)" in report
    assert "| parallel_loop | 2 |" in report.split("## Decode latency")[1].split("## ")[0]
    assert "Learned halting at decode" in report.split("## Decode latency")[1].split("## ")[0]
    (out / "decode.json").rename(out / "decode.moved")  # loopscope-plot without decode.json
    try:
        from experiments.results.report import write_report

        text = write_report(out).read_text()
        assert "No `decode.json` in this run directory" in text
    finally:
        (out / "decode.moved").rename(out / "decode.json")


def test_finished_run_is_skipped_when_rerun(smoke_run):
    out, _ = smoke_run
    before = (out / "results.parquet").stat().st_mtime_ns
    again = run(compose_cfg(["experiment=smoke"]), out_dir=out)
    assert again["skipped"] is True
    assert (out / "results.parquet").stat().st_mtime_ns == before


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e != "smoke"])
def test_every_experiment_runs_end_to_end_at_smoke_size(experiment, tmp_path):
    summary = run(compose_cfg([f"experiment={experiment}", *EXPERIMENTS[experiment]]),
                  out_dir=tmp_path)
    assert summary["status"] == "finished"
    quality = "bits_per_byte" if experiment == "loopcoder" else "accuracy"
    tables = check_run_dir(tmp_path, quality, figures=False)
    if experiment == "convergence_study":
        assert set(tables["results"]["arch"]) == {"parallel_loop", "serial_loop",
                                                  "recurrent_depth", "deq"}
    if experiment == "halting_comparison":
        assert {"act", "pondernet", "halt_token", "q_halt", "convergence_acceleration",
                "ouro_gate"} <= set(tables["results"]["controller"])
        assert "oracle_regret" in set(tables["results"]["metric"])


def test_job_seed_is_derived_from_base_and_job_number():
    assert job_seed(3, None) == 3 and job_seed(3, 0) == 3
    assert len({job_seed(3, n) for n in range(10)}) == 10
    assert job_seed(3, 1) != job_seed(4, 1)


def test_two_job_joblib_multirun_and_resume_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "experiments", "-m", "experiment=smoke", "seed=0,1",
           "hydra/launcher=local", f"hydra.sweep.dir={sweep}", "study.train_loops=[1]",
           "~study.learned.ouro_gate", "~eval.controllers.solver", "train.steps=2",
           "eval.attention_samples=0", "eval.figures=false", "train.workers=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = [json.loads((sweep / str(n) / "status.json").read_text()) for n in (0, 1)]
    assert [s["status"] for s in statuses] == ["finished", "finished"]
    assert statuses[0]["seed"] != statuses[1]["seed"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already finished; skipped") == 2


@pytest.mark.slow
def test_two_process_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--standalone", "-m", "experiments",
           "experiment=smoke", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra",
           "threads=1", "study.train_loops=[1]",
           "~study.learned.ouro_gate", "eval.figures=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run_dir(tmp_path, figures=False)
