"""``loopscope-plot`` redraws from saved results; ``loopscope-diagnose`` prints verdicts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from experiments.cli.tools import diagnose_main, plot_main
from experiments.figures import FIGURES
from experiments.study import run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    overrides = ["experiment=smoke", "study.train_loops=[2]", "~eval.controllers.solver",
                 "eval.attention_samples=2", "eval.figures=false"]
    with initialize_config_module("experiments.conf", version_base="1.3"):
        run(compose("config", overrides=overrides), out_dir=out)
    return out


def test_plot_draws_every_figure_and_the_report_from_saved_results(saved_run, capsys,
                                                                   monkeypatch):
    figures = saved_run / "figures"
    shutil.rmtree(figures, ignore_errors=True)
    (saved_run / "report.md").unlink()
    # nothing may be recomputed: training and evaluation are unreachable from the plot command
    monkeypatch.setattr("experiments.evaluate.evaluate_model", None)
    monkeypatch.setattr("experiments.train.train_model", None)
    plot_main([str(saved_run)])
    assert {p.stem for p in figures.glob("*.png")} == set(FIGURES)
    assert all(p.stat().st_size > 1000 for p in figures.glob("*.png"))
    report = (saved_run / "report.md").read_text()
    assert "## Figures" in report and "figures/gain_cost.png" in report
    assert str(figures / "gain_cost.png") in capsys.readouterr().out


def test_diagnose_prints_a_verdict_table(saved_run, capsys):
    checkpoint = next(saved_run.glob("models/*fixed-L2/model.safetensors"))
    diagnose_main([str(checkpoint), "--loops", "12", "--batch", "8"])
    out = capsys.readouterr().out
    assert "unrolled 12 loops on 8 parity samples" in out
    header, rule, *rows = out.strip().splitlines()[1:]
    assert header.split()[:3] == ["verdict", "count", "share"] and "median rho" in header
    labels = {"converged", "converging", "periodic", "quasi_periodic", "chaotic", "aperiodic",
              "drifting", "diverging", "undetermined"}
    assert rows and all(row.split()[0] in labels for row in rows)
    assert sum(int(row.split()[-4]) for row in rows) == 8  # counts cover the batch


@pytest.mark.parametrize("make_args,message", [
    (lambda d: ["/no/such/model.safetensors"], "does not exist"),
    (lambda d: [str(d / "corrupt.safetensors")], "cannot load checkpoint"),
    (lambda d: [str(d / "model.safetensors"), "--loops", "3"], "--loops must be >= 8"),
])
def test_diagnose_bad_input_exits_2_with_one_line(tmp_path, capsys, make_args, message):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        diagnose_main(make_args(tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_diagnose_without_task_info_asks_for_task(saved_run, tmp_path, capsys):
    checkpoint = next(saved_run.glob("models/*fixed-L2/model.safetensors"))
    lone = tmp_path / "lone" / "model.safetensors"
    lone.parent.mkdir()
    shutil.copy(checkpoint, lone)
    shutil.copy(checkpoint.with_suffix(".json"), lone.with_suffix(".json"))
    with pytest.raises(SystemExit) as exit_info:
        diagnose_main([str(lone)])
    assert exit_info.value.code == 2 and "pass --task NAME" in capsys.readouterr().err
    # parity's defaults make longer sequences than this model was built for: a clear refusal
    with pytest.raises(SystemExit) as exit_info:
        diagnose_main([str(lone), "--task", "parity", "--batch", "4", "--loops", "8"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "does not fit the model" in err


@pytest.mark.parametrize("make_dir,message", [
    (lambda d: d / "missing", "is not a directory"),
    (lambda d: d, "is not a readable loopscope run"),
])
def test_plot_bad_run_dir_exits_2(tmp_path, capsys, make_dir, message):
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(make_dir(tmp_path))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_console_scripts_are_installed():
    bin_dir = Path(ROOT / ".venv" / "bin")
    for name in ("loopscope", "loopscope-plot", "loopscope-diagnose"):
        assert (bin_dir / name).exists(), name
    proc = subprocess.run([str(bin_dir / "loopscope-plot"), "/no/such/run"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
