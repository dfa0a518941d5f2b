"""Figures on small synthetic schema tables: titled axes, labelled x/y, non-empty artists, and
the readability properties that broke on a real study (crowded legends, legends over data,
overlapping tick labels, collapsed constrained layouts, one axes for every series)."""

import warnings

import numpy as np
import pandas as pd
import pytest

from experiments import figures as fg
from experiments.results import write_parquet
from experiments.results.schema import RESULTS_COLUMNS, SAMPLES_COLUMNS, TRACES_COLUMNS

LOOPS = 5
CONTROLLERS = ["fixed", "convergence_residual", "convergence_kl", "solver", "ouro_gate"]
SPLITS = ["val", "hard"]
RUNS = ["serial_loop-fixed-L1", "serial_loop-fixed-L2", "serial_loop-ouro_gate-L2"]


def synthetic_results() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for arch in ["serial_loop", "parallel_loop"]:
        for train_loops in [1, 2]:
            for controller, budget, split in [(c, b, s) for c in CONTROLLERS for b in [1, 2, 4]
                                              for s in SPLITS]:
                base = [f"{arch}-{train_loops}", "parity", arch, "ce", train_loops, controller,
                        budget, split]
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
    for run, controller in [(r, c) for r in RUNS for c in CONTROLLERS]:
        for budget in [4, 16]:
            for sample in range(12):
                difficulty = 2 + sample % 4  # val: 2, 3; hard: 4, 5
                depth = budget if controller == "fixed" else min(budget, difficulty + sample % 2)
                label = labels[(sample + budget) % 5]
                rows.append([run, "serial_loop", "ce", 2, controller, budget,
                             "val" if difficulty < 4 else "hard", sample, difficulty,
                             depth, float("nan"), sample % 2 == 0, 0.5, label,
                             2 if label == "periodic" else 0, 0.5, 0.9])
    return pd.DataFrame(rows, columns=SAMPLES_COLUMNS)


@pytest.fixture(scope="module")
def tables():
    return {"results": synthetic_results(), "traces": synthetic_traces(),
            "samples": synthetic_samples()}


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.axison]


def lowest_in_column(ax, axes):
    """True when no other visible axes of the same grid sits below ``ax`` in its column."""
    spec = ax.get_subplotspec()
    return not any(o.get_subplotspec().get_gridspec() is spec.get_gridspec()
                   and o.get_subplotspec().colspan.start == spec.colspan.start
                   and o.get_subplotspec().rowspan.start > spec.rowspan.start for o in axes)


def first_in_row(ax, axes):
    spec = ax.get_subplotspec()
    return not any(o.get_subplotspec().get_gridspec() is spec.get_gridspec()
                   and o.get_subplotspec().rowspan.start == spec.rowspan.start
                   and o.get_subplotspec().colspan.start < spec.colspan.start for o in axes)


def check_figure(fig, n_axes_min=1):
    """Titled, labelled, non-empty panels; <= 10 legend entries per legend, no legend over any
    panel; no overlapping tick labels; width <= 16 in; no layout warning when drawn."""
    axes = visible_axes(fig)
    assert len(axes) >= n_axes_min
    assert fig.get_figwidth() <= 16.01
    for ax in axes:
        assert ax.get_title(), "untitled axes"
        if lowest_in_column(ax, axes):
            assert ax.get_xlabel(), ax.get_title()
        if first_in_row(ax, axes):
            assert ax.get_ylabel(), ax.get_title()
        artists = ax.lines + ax.collections + ax.patches + ax.images
        assert artists, f"empty axes: {ax.get_title()}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied ... collapsed"
        fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for legend in legends:
        assert len(legend.get_texts()) <= 10, [t.get_text() for t in legend.get_texts()]
        box = legend.get_window_extent(renderer)
        for ax in axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    assert not a.overlaps(b), f"overlapping tick labels in {ax.get_title()}"
    fg.plt.close(fig)


@pytest.mark.parametrize("name,table,panels", [
    ("convergence_traces", "traces", 2), ("oscillation", "results", 3), ("heatmaps", "traces", 4),
    ("phase_portraits", "traces", 2), ("verdicts", "samples", 6),
    ("depth_histograms", "samples", 12), ("representation", "results", 7),
    ("gain_cost", "results", 2), ("accuracy_vs_loops", "results", 8),
])
def test_each_figure(tables, name, table, panels):
    draw = fg.FIGURES[name][1]
    kwargs = {"tol": 1e-2} if name == "convergence_traces" else {}
    fig = draw(tables[table], **kwargs)
    check_figure(fig, panels)


def test_one_panel_per_model_and_split(tables):
    """Small multiples: accuracy_vs_loops has runs x splits panels, each with the fixed sweep
    line and its own controllers' points; the legend encodes controllers and budgets once."""
    results = tables["results"]
    fig = fg.fig_accuracy_vs_loops(results)
    axes = visible_axes(fig)
    assert len(axes) == results["run"].nunique() * results["split"].nunique()
    titles = {ax.get_title() for ax in axes}
    assert {"serial_loop-1 · hard", "parallel_loop-2 · val"} <= titles
    assert all(len(ax.lines) == 1 and len(ax.collections) == 4 * 3 for ax in axes)  # ctrl x K
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0] == "fixed-count sweep" and "budget K=4" in labels
    assert len(labels) == 1 + 4 + 3  # sweep, 4 adaptive controllers, 3 budgets
    fg.plt.close(fig)


def test_convergence_traces_facets_and_tolerance_once(tables):
    traces = tables["traces"].copy()
    hard = traces.assign(split="hard")
    fig = fg.fig_convergence_traces(pd.concat([traces, hard]), tol=1e-2)
    axes = visible_axes(fig)
    assert len(axes) == 2 * 2  # (r0-serial_loop, r0-deq) x (val, hard)
    assert all(len([line for line in ax.lines if line.get_linestyle() != ":"]) == 5
               for ax in axes)  # one median line per controller, not per sample or budget
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels.count("tolerance 0.01") == 1 and len(labels) == 6
    fg.plt.close(fig)


def test_depth_histograms_rows_are_distributions(tables):
    samples = tables["samples"]
    fig = fg.fig_depth_histograms(samples)
    axes = visible_axes(fig)
    assert len(axes) == len(RUNS) * (len(CONTROLLERS) - 1)  # fixed is left out
    for ax in axes:
        share = ax.images[0].get_array()  # (difficulty, depth)
        assert share.shape == (samples["difficulty"].nunique(), 16)  # largest budget K=16
        np.testing.assert_allclose(share.sum(axis=1), 1.0)
        assert ax.get_xlabel() in ("", "exit depth (loops used)")
    fg.plt.close(fig)
    with pytest.raises(ValueError, match="missing column"):
        fg.fig_depth_histograms(samples.drop(columns=["depth"]))


def test_run_labels_drop_shared_parts():
    from experiments.figures.style import run_labels
    assert run_labels(["a-fixed-L1", "a-fixed-L2"]) == {"a-fixed-L1": "L1", "a-fixed-L2": "L2"}
    assert run_labels(["only-run"]) == {"only-run": "only-run"}
    assert run_labels(["x-1", "y"]) == {"x-1": "x-1", "y": "y"}


def test_units_in_labels(tables):
    fig = fg.fig_convergence_traces(tables["traces"], tol=1e-2)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "loop k" and "(log)" in ax.get_ylabel()
    assert ax.get_yscale() == "log"
    assert any(line.get_linestyle() == ":" for line in ax.lines)  # tolerance line
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
    assert names == {"oscillation", "verdicts", "depth_histograms", "representation", "gain_cost",
                     "accuracy_vs_loops"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" and p.parent.name == "figures" for p in paths)
    assert set(skipped) == {"convergence_traces", "heatmaps", "phase_portraits"}
    assert "traces.parquet" in skipped["heatmaps"]
    only_traces = tmp_path / "traces_only"
    write_parquet(tables["results"].iloc[:0], only_traces / "results.parquet")  # empty results
    write_parquet(tables["traces"], only_traces / "traces.parquet")
    names = {p.stem for p in fg.draw_all(only_traces)}
    assert names == {"convergence_traces", "heatmaps", "phase_portraits"}


def test_draw_all_in_two_processes_writes_the_same_bytes(tmp_path, tables):
    for where in ("one", "two"):  # results only: four figures, enough to share out
        write_parquet(tables["results"], tmp_path / where / "results.parquet")
    one = fg.draw_all(tmp_path / "one", workers=1)
    two = fg.draw_all(tmp_path / "two", workers=2)
    assert [p.name for p in one] == [p.name for p in two] == [
        "oscillation.png", "representation.png", "gain_cost.png", "accuracy_vs_loops.png"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        fg.draw_all(tmp_path / "one", workers=0)


def test_draw_all_in_two_processes_reports_a_helper_failure(tmp_path, tables, monkeypatch):
    write_parquet(tables["results"], tmp_path / "results.parquet")

    def broken(frame, **kwargs):
        raise KeyError("bad column")

    # the cheapest figure is drawn last, so a forked helper (or the main process) meets it
    monkeypatch.setitem(fg.FIGURES, "gain_cost", ("results", broken))
    with pytest.raises(ValueError, match="figure gain_cost cannot be drawn"):
        fg.draw_all(tmp_path, workers=2)
    assert not (tmp_path / "figures").exists()  # nothing written when one figure fails
