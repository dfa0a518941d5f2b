"""Figures on small synthetic schema tables: titled axes, labelled x/y, non-empty artists."""

import numpy as np
import pandas as pd
import pytest

from experiments import figures as fg
from experiments.results import write_parquet
from experiments.schema import RESULTS_COLUMNS, SAMPLES_COLUMNS, TRACES_COLUMNS

LOOPS = 5
CONTROLLERS = ["fixed", "convergence"]


def synthetic_results() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for arch in ["serial_loop", "parallel_loop"]:
        for train_loops in [1, 2]:
            for controller in CONTROLLERS:
                for budget in [1, 2, 4]:
                    base = [f"{arch}-{train_loops}", "parity", arch, "ce", train_loops,
                            controller, budget, "val"]
                    accuracy = 1 - 0.5 / (1 + budget) + 0.02 * rng.standard_normal()
                    mean_loops = budget if controller == "fixed" else 0.7 * budget
                    for metric, value in [("accuracy", accuracy), ("mean_loops", mean_loops),
                                          ("flops_per_token", 1e6 * mean_loops),
                                          ("spectral_radius", 0.8 + 0.1 * rng.random())]:
                        rows.append([*base, budget, metric, value])
            base = [f"{arch}-{train_loops}", "parity", arch, "ce", train_loops, "fixed", LOOPS,
                    "val"]
            for k in range(1, LOOPS + 1):
                for metric, value in [("relative_residual", 0.5**k), ("cos_prev", -0.9 + 0.01 * k),
                                      ("period2_return_error", 0.3**k),
                                      ("effective_rank", 5 + k), ("attention_js", 0.1 / k),
                                      ("logit_lens_kl", 2.0**-k), ("accuracy_at_loop", k / LOOPS)]:
                    rows.append([*base, k, metric, value])
                rows += [[*base, k, f"cka@{j}", 1 / (1 + abs(k - j))] for j in range(1, LOOPS + 1)]
    return pd.DataFrame(rows, columns=RESULTS_COLUMNS)


def synthetic_traces() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for arch in ["serial_loop", "deq"]:
        for controller in CONTROLLERS:
            for sample in range(3):
                for k in range(1, LOOPS + 1):
                    base = ["r0", arch, controller, LOOPS, "val", sample]
                    rows.append([*base, -1, k, "residual", 0.6**k * np.exp(0.2 * rng.normal())])
                    for token in range(4):
                        rows.append([*base, token, k, "dist_to_final", (LOOPS - k) * (token + 1)])
                        angle = k * 0.9 + token
                        rows.append([*base, token, k, "pc1", np.cos(angle) / k])
                        rows.append([*base, token, k, "pc2", np.sin(angle) / k])
                for token in range(4):
                    rows.append(["r0", arch, controller, LOOPS, "val", sample, token, LOOPS,
                                 "halt_depth", 1 + (token + sample) % LOOPS])
    return pd.DataFrame(rows, columns=TRACES_COLUMNS)


def synthetic_samples() -> pd.DataFrame:
    labels = ["converged", "periodic", "chaotic", "drifting", "converging"]
    rows = []
    for controller in CONTROLLERS:
        for budget in [4, 16]:
            for sample in range(10):
                rows.append(["r0", "serial_loop", "ce", 2, controller, budget, "val", sample, 3,
                             budget, sample % 2 == 0, 0.5, labels[(sample + budget) % 5],
                             2 if labels[(sample + budget) % 5] == "periodic" else 0, 0.5, 0.9])
    return pd.DataFrame(rows, columns=SAMPLES_COLUMNS)


@pytest.fixture(scope="module")
def tables():
    return {"results": synthetic_results(), "traces": synthetic_traces(),
            "samples": synthetic_samples()}


def check_figure(fig, n_axes_min=1):
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(axes) >= n_axes_min
    for ax in axes:
        assert ax.get_title(), "untitled axes"
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
        artists = ax.lines + ax.collections + ax.patches + ax.images
        assert artists, f"empty axes: {ax.get_title()}"
    fg.plt.close(fig)


@pytest.mark.parametrize("name,table,panels", [
    ("convergence_traces", "traces", 2), ("oscillation", "results", 3), ("heatmaps", "traces", 5),
    ("phase_portraits", "traces", 4), ("verdicts", "samples", 1),
    ("representation", "results", 4), ("gain_cost", "results", 2),
    ("accuracy_vs_loops", "results", 2),
])
def test_each_figure(tables, name, table, panels):
    draw = fg.FIGURES[name][1]
    kwargs = {"tol": 1e-2} if name == "convergence_traces" else {}
    fig = draw(tables[table], **kwargs)
    check_figure(fig, panels)


def test_units_in_labels(tables):
    fig = fg.fig_convergence_traces(tables["traces"], tol=1e-2)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "loop k" and "(log)" in ax.get_ylabel()
    assert ax.get_yscale() == "log"
    assert any(line.get_linestyle() == "--" for line in ax.lines)  # tolerance line
    fg.plt.close(fig)


def test_missing_data_raises_value_error(tables):
    with pytest.raises(ValueError, match="residual"):
        fg.fig_convergence_traces(tables["traces"][tables["traces"]["metric"] != "residual"])
    with pytest.raises(ValueError, match="accuracy"):
        fg.fig_gain_cost(tables["results"][tables["results"]["metric"] == "cos_prev"])
    with pytest.raises(ValueError, match="missing column"):
        fg.fig_verdicts(tables["samples"].drop(columns=["label"]))


def test_draw_all_writes_pngs_and_skips_absent(tmp_path, tables):
    write_parquet(tables["results"], tmp_path / "results.parquet")
    write_parquet(tables["samples"], tmp_path / "samples.parquet")
    skipped = {}
    paths = fg.draw_all(tmp_path, skipped=skipped)
    names = {p.stem for p in paths}
    assert names == {"oscillation", "verdicts", "representation", "gain_cost", "accuracy_vs_loops"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" and p.parent.name == "figures" for p in paths)
    assert set(skipped) == {"convergence_traces", "heatmaps", "phase_portraits"}
    assert "traces.parquet" in skipped["heatmaps"]
    only_traces = tmp_path / "traces_only"
    write_parquet(tables["results"].iloc[:0], only_traces / "results.parquet")  # empty results
    write_parquet(tables["traces"], only_traces / "traces.parquet")
    names = {p.stem for p in fg.draw_all(only_traces)}
    assert names == {"convergence_traces", "heatmaps", "phase_portraits"}
