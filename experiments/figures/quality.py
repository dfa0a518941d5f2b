"""Quality-versus-compute figures (part of ``experiments.figures``, which re-exports them).

``fig_gain_cost``: the gain-cost curve of loop count (Dehghani et al. 2019 report quality vs
loops for Universal Transformers; the marginal gain per added loop against its added FLOPs is the
question of Geiping et al. 2025, arXiv 2502.05171, §5). ``fig_accuracy_vs_loops``: every adaptive
controller's (mean loops used, quality) point beside the fixed-count sweep of the same model,
which is the reference an adaptive rule has to beat (Graves 2016, arXiv 1603.08983, Fig. 9).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from experiments.figures import style as fs
from experiments.figures.style import plt
from experiments.results import validate_frame

BUDGET_MARKERS = ["o", "s", "^", "D", "v", "P"]


def _scale(values: pd.Series) -> tuple[float, str]:
    return (1e9, "GFLOPs") if values.max() >= 1e9 else (1e6, "MFLOPs")


def _gain_x(fixed: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Train loops when the table spans several (each model at its own depth), else budget."""
    if "train_loops" in fixed.columns and fixed["train_loops"].nunique() > 1:
        own = fixed[fixed["budget"] == fixed["train_loops"]]
        if not own.empty:
            return own, "train_loops"
    return fixed, "budget"


@fs.styled_figure
def fig_gain_cost(results: pd.DataFrame) -> Figure:
    """Gain-cost curve of loop count for the ``fixed`` controller: quality vs loops (train loops
    when the table spans several models, else the evaluation budget; colour = model family, line
    style = split), and the marginal gain of each added loop, labelled with its added compute
    (FLOPs per token when recorded)."""
    validate_frame(results, ["controller", "budget", "metric", "value"])
    metric, label = fs.quality(results)
    fixed = results[results["controller"] == "fixed"]
    if fixed.empty:
        raise ValueError("fig_gain_cost needs rows of the 'fixed' controller")
    fixed, x = _gain_x(fs.prepare(fixed))
    keys = [k for k in ("arch", "objective", "task") if k in fixed.columns
            and fixed[k].nunique() > 1]
    fixed = fixed.assign(family=fixed[keys].astype(str).agg(" · ".join, axis=1) if keys
                         else "fixed-count models")
    curve = (fs.metric(fixed, metric).groupby(["family", "split", x])["value"].mean()
             .rename("quality").reset_index())
    families, splits = fs.ordered(curve["family"], []), fs.ordered(curve["split"])
    colours = fs.series_colours(families)
    fig, axes = fs.facet_grid(["all"], ["quality", "gain"], panel=(4.6, 3.2))
    ax = axes[("all", "quality")]
    for (family, split), part in curve.groupby(["family", "split"]):
        ax.plot(part[x], part["quality"], color=colours[family], marker="o", markersize=4,
                linestyle=fs.SPLIT_DASH.get(split, "-"))
    fs.integer_ticks(ax)
    ax.set(xlabel="train loops" if x == "train_loops" else "loops (fixed count)", ylabel=label,
           title="Quality vs loop count")
    _gain_bars(axes[("all", "gain")], curve, fs.metric(fixed, "flops_per_token"), x, metric,
               colours, splits)
    handles = [fs.handle(f, colours[f]) for f in families] + fs.split_handles(splits)
    fs.figure_legend(fig, handles, "model family")
    fig.suptitle("Gain-cost of loop count (fixed controller)")
    return fig


def _gain_bars(ax: plt.Axes, curve: pd.DataFrame, flops: pd.DataFrame, x: str, metric: str,
               colours: dict[str, Any], splits: list[str]) -> None:
    """Bars of the quality gained per added loop at each step a->b (hatched: second split)."""
    sign = -1.0 if metric == "bits_per_byte" else 1.0
    rows = []
    for (family, split), part in curve.groupby(["family", "split"]):
        part = part.sort_values(x)
        steps = part[x].astype(float).diff()
        gain = sign * part["quality"].diff() / steps  # per added loop
        for prev, step, value in zip(part[x].iloc[:-1], part[x].iloc[1:], gain.iloc[1:]):
            rows.append((family, split, prev, step, value))
    gains = pd.DataFrame(rows, columns=["family", "split", "prev", "step", "gain"])
    if gains.empty:
        fs.empty_panel(ax, "one loop count only: no marginal gain")
        ax.set_title("Marginal gain per added loop")
        return
    steps = sorted(set(zip(gains["prev"], gains["step"])))
    bars = sorted(set(zip(gains["family"], gains["split"])),
                  key=lambda b: (list(colours).index(b[0]), splits.index(b[1])))
    width = 0.8 / len(bars)
    for i, (family, split) in enumerate(bars):
        part = gains[(gains["family"] == family) & (gains["split"] == split)]
        where = [steps.index((p, s)) + (i - (len(bars) - 1) / 2) * width
                 for p, s in zip(part["prev"], part["step"])]
        ax.bar(where, part["gain"], width=width, color=colours[family],
               hatch="//" if split != splits[0] else None, edgecolor="w", linewidth=0.5)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set_xticks(range(len(steps)), _step_labels(steps, flops, x))
    every = max(1, int(np.ceil(len(steps) / 8)))
    for i, tick in enumerate(ax.get_xticklabels()):
        tick.set_visible(i % every == 0)
    hatched = f" (hatched: {splits[1]})" if len(splits) > 1 else ""
    ax.set(xlabel="added loop a→b (+ added compute per token)",
           ylabel=f"gain in {metric} per added loop",
           title="Marginal gain per added loop" + hatched)


def _step_labels(steps: list[tuple[Any, Any]], flops: pd.DataFrame, x: str) -> list[str]:
    if flops.empty:
        return [f"{a}→{b}" for a, b in steps]
    cost = flops.groupby(x)["value"].mean()
    scale, unit = _scale(cost)
    return [f"{a}→{b}\n+{(cost.get(b, np.nan) - cost.get(a, np.nan)) / scale:.2g} {unit}"
            for a, b in steps]


def _quality_table(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    data = fs.prepare(results[results["metric"].isin([metric, "mean_loops", "flops_per_token"])])
    wide = (data.assign(value=pd.to_numeric(data["value"], errors="coerce"))
            .pivot_table(index=["model", "controller", "budget", "split"], columns="metric",
                         values="value", aggfunc="mean").reset_index())
    if "mean_loops" not in wide.columns or metric not in wide.columns:
        raise ValueError(f"fig_accuracy_vs_loops needs metrics {metric!r} and 'mean_loops'")
    return wide.dropna(subset=[metric, "mean_loops"])


def _compute_fit(wide: pd.DataFrame) -> tuple[float, float] | None:
    """``(a, b)`` with FLOPs per token = a + b x mean loops for every model (within 2%), else
    None (cost not one affine function of loops, or not recorded)."""
    if "flops_per_token" not in wide.columns:
        return None
    data = wide.dropna(subset=["flops_per_token"])
    if data.empty or data["mean_loops"].nunique() < 2:
        return None
    slope, offset = np.polyfit(data["mean_loops"], data["flops_per_token"], 1)
    fitted = offset + slope * data["mean_loops"]
    error = np.abs(fitted - data["flops_per_token"]) / data["flops_per_token"].abs()
    return (float(offset), float(slope)) if error.max() < 0.02 else None


@fs.styled_figure
def fig_accuracy_vs_loops(results: pd.DataFrame) -> Figure:
    """Quality against mean loops used, one panel per model x split: the fixed-count sweep as a
    reference line, each adaptive controller (colour) at each budget (marker). Compute (FLOPs
    per token) is stated in the title when it is one affine function of loops for every model,
    else drawn as a second row of panels per split."""
    validate_frame(results, ["controller", "budget", "metric", "value"])
    metric, label = fs.quality(results)
    wide = _quality_table(results, metric)
    splits, models, labels, note = fs.facets(wide)
    xs, unit, compute_note = ["mean_loops"], "", ""
    if "flops_per_token" in wide.columns and wide["flops_per_token"].notna().any():
        scale, unit = _scale(wide["flops_per_token"])
        wide["compute"] = wide["flops_per_token"] / scale
        fit = _compute_fit(wide)
        if fit is None:
            xs.append("compute")  # cost is not one function of loops: show both
        else:
            compute_note = (f" (compute ≈ {fit[0] / scale:.3g} + {fit[1] / scale:.3g} × loops "
                            f"{unit} per token)")
    adaptive = wide[wide["controller"] != "fixed"]
    colours = fs.controller_colours(adaptive["controller"])
    budgets = sorted(adaptive["budget"].unique())
    markers = {b: BUDGET_MARKERS[i % len(BUDGET_MARKERS)] for i, b in enumerate(budgets)}
    rows = [(split, x) for x in xs for split in splits]
    fig, axes = fs.facet_grid(rows, models, sharey=True)
    for ((split, x), model), ax in axes.items():
        part = wide[(wide["model"] == model) & (wide["split"] == split)]
        _quality_panel(ax, part, x, metric, colours, markers)
        ax.set_title(f"{labels[model]} · {split}" + (" · compute" if x != "mean_loops" else ""))
    for x in xs:
        x_label = "mean loops used (log2)" if x == "mean_loops" else f"compute ({unit} / token)"
        fs.outer_labels([a for ((_, x_), _), a in axes.items() if x_ == x], x_label, label)
    handles = ([fs.handle("fixed-count sweep", fs.FIXED_COLOUR, "-", ".")]
               + [fs.handle(c, colour, "none", "o", filled=False) for c, colour in colours.items()]
               + [fs.handle(f"budget K={b}", "0.4", "none", markers[b], filled=False)
                  for b in budgets])
    fs.figure_legend(fig, handles, "controller")
    fig.suptitle(f"{label.split(' (')[0].capitalize()} vs loops used{compute_note}{note}")
    return fig


def _quality_panel(ax: plt.Axes, part: pd.DataFrame, x: str, metric: str,
                   colours: dict[str, Any], markers: dict[Any, str]) -> None:
    sweep = part[part["controller"] == "fixed"].sort_values(x)
    ax.plot(sweep[x], sweep[metric], color=fs.FIXED_COLOUR, linewidth=1.2, marker=".",
            markersize=5, zorder=1)
    for (controller, budget), point in part[part["controller"] != "fixed"].groupby(
            ["controller", "budget"]):
        ax.scatter(point[x], point[metric], marker=markers[budget], s=42, linewidths=1.5,
                   facecolors="none", edgecolors=[colours[controller]], zorder=3)
    if x == "mean_loops":
        _log2_axis(ax, part[x])
    else:
        ax.locator_params(axis="x", nbins=4)


def _log2_axis(ax: plt.Axes, values: pd.Series) -> None:
    ax.set_xscale("log", base=2)
    top = max(float(values.max()) if len(values) else 1.0, 1.0)
    ticks = [2**i for i in range(int(np.ceil(np.log2(top))) + 1)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
