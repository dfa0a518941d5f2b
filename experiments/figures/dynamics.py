"""Figures drawn from a run's tables (``experiments.results.schema``); each ``fig_*`` returns a
Figure.

Which rows each figure reads (metric names are the ``metric`` column):

=========================  ==========  ======================================================
figure                     table       metrics / columns
=========================  ==========  ======================================================
``convergence_traces``     traces      ``residual`` (token -1); optional tolerance argument
``oscillation``            results     ``cos_prev``, ``period2_return_error``; optional
                                       ``spectral_radius`` (or samples' ``spectral_radius``)
``heatmaps``               traces      ``dist_to_final`` (token >= 0); optional ``halt_depth``
                                       (loops used by a token, token >= 0)
``phase_portraits``        traces      ``pc1``, ``pc2`` (token >= 0)
``verdicts``               samples     ``label`` per controller x budget
``depth_histograms``       samples     ``depth`` per ``difficulty`` per controller
``representation``         results     any of ``effective_rank``, ``cka@<j>``,
                                       ``attention_js``, ``logit_lens_kl``
``gain_cost``              results     ``fixed`` controller: ``accuracy`` or ``bits_per_byte``;
                                       optional ``flops_per_token``
``accuracy_vs_loops``      results     ``accuracy`` (or ``bits_per_byte``), ``mean_loops``;
                                       optional ``flops_per_token``
=========================  ==========  ======================================================

Layout (``experiments.figures.style``): small multiples with one panel per model (the ``run``
column, plus ``arch`` when a run holds several) and one panel row per split (``val`` above
``hard``); colour encodes the controller (``fixed`` near-black) or, where one controller is
shown, the model; one legend per figure outside the panels. Per-loop pictures of a single
trajectory (heatmaps, portraits, per-loop diagnostics) use the ``fixed`` controller at its largest
budget when it is present: it runs every loop, so nothing is cut short by a halting rule. The
trajectory pictures follow Huginn's study (Geiping et al. 2025, arXiv 2502.05171): token x step
heatmaps of the distance to the final state with a log colour scale, and PCA phase portraits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from experiments.figures import style as fs
from experiments.figures.style import plt
from experiments.results import validate_frame

VERDICT_ORDER = ["converged", "converging", "periodic", "quasi_periodic", "chaotic", "aperiodic",
                 "drifting", "diverging"]


@fs.styled_figure
def fig_convergence_traces(traces: pd.DataFrame, tol: float | None = None) -> Figure:
    """Relative residual per loop: median line and 2.5-97.5 percentile band over samples, one
    panel per model x split, colour = controller (each at its largest budget), dotted line at the
    tolerance ``tol`` when given."""
    validate_frame(traces, ["loop", "metric", "value"])
    fs.need(traces, ["residual"], "fig_convergence_traces")
    data = fs.metric(traces, "residual")
    if "token" in data.columns and (data["token"] == -1).any():
        data = data[data["token"] == -1]
    data = fs.largest_budget(fs.prepare(data[data["value"] > 0]))
    splits, models, labels, note = fs.facets(data)
    summary = fs.quantile_lines(data, ["model", "controller", "split"])
    colours = fs.controller_colours(data["controller"])
    fig, axes = fs.facet_grid(splits, models, sharex=True, sharey=True)
    for (split, model), ax in axes.items():
        part = summary[(summary["model"] == model) & (summary["split"] == split)]
        for controller, line in part.groupby("controller"):
            fs.band_line(ax, line, colours[controller])
        if tol is not None:
            ax.axhline(tol, color="0.35", linestyle=":", linewidth=1.2)
        ax.set_yscale("log")
        ax.set_title(f"{labels[model]} · {split}")
        fs.integer_ticks(ax)
    fs.outer_labels(axes.values(), "loop k", "relative residual ||Δ||/||h|| (log)")
    budgets = data.groupby("controller")["budget"].unique() if "budget" in data.columns else {}
    handles = [fs.handle(name + (f" (K={budgets[name][0]})" if len(budgets) and
                                 len(budgets[name]) == 1 else ""), colour, marker="o")
               for name, colour in colours.items()]
    if tol is not None:
        handles.append(fs.handle(f"tolerance {tol:g}", "0.35", ":"))
    fs.figure_legend(fig, handles, "controller")
    fig.suptitle("Convergence: median relative residual per loop (band: 95% of samples)" + note)
    return fig


def _per_loop_lines(ax: plt.Axes, df: pd.DataFrame, colours: dict[str, Any],
                    log_y: bool = False) -> None:
    """One line per model (colour) x split (line style) of a per-loop aggregate metric."""
    for (model, split), part in df.groupby(["model", "split"]):
        if model not in colours:
            continue
        part = part.groupby("loop")["value"].mean()
        ax.plot(part.index, part.to_numpy(), color=colours[model],
                linestyle=fs.SPLIT_DASH.get(split, "-"), linewidth=1.3, marker="o", markersize=2)
    if log_y:
        ax.set_yscale("log")
    fs.integer_ticks(ax)


def _model_handles(models: Sequence[str], labels: dict[str, str], colours: dict[str, Any],
                   splits: Sequence[str]) -> list[Any]:
    return ([fs.handle(labels[m], colours[m]) for m in models] + fs.split_handles(splits))


def _spectral_radius(results: pd.DataFrame, samples: pd.DataFrame | None) -> pd.DataFrame:
    radius = fs.metric(results, "spectral_radius")
    if radius.empty and samples is not None and "spectral_radius" in samples.columns:
        radius = samples.assign(value=pd.to_numeric(samples["spectral_radius"], errors="coerce"))
        radius = radius[np.isfinite(radius["value"])]
    return fs.prepare(radius) if not radius.empty else radius


@fs.styled_figure
def fig_oscillation(results: pd.DataFrame, samples: pd.DataFrame | None = None) -> Figure:
    """Successive-update cosine and period-2 return error per loop (colour = model, line style =
    split), and the spectral radius of the loop map at the final state per model (median and 95%
    range over samples when per-sample values are given)."""
    validate_frame(results, ["loop", "metric", "value"])
    for name in ("cos_prev", "period2_return_error"):
        fs.need(results, [name], "fig_oscillation")
    per_loop = fs.prepare(results[results["metric"].isin(["cos_prev", "period2_return_error"])])
    per_loop, which = fs.one_controller(per_loop)
    radius = _spectral_radius(results, samples)
    splits, models, labels, note = fs.facets(per_loop)
    colours = fs.series_colours(models)
    panels = ["cos", "p2"] + (["rho"] if not radius.empty else [])
    fig, axes = fs.facet_grid(["all"], panels, panel=(3.6, 2.8))
    ax = axes[("all", "cos")]
    _per_loop_lines(ax, fs.metric(per_loop, "cos_prev"), colours)
    ax.axhline(-1, color="0.6", linewidth=0.8, linestyle=":")
    ax.set(ylim=(-1.05, 1.05), xlabel="loop k", ylabel="cos(Δ_k, Δ_{k-1})",
           title="Successive-update cosine (-1: period 2)")
    ax = axes[("all", "p2")]
    _per_loop_lines(ax, fs.metric(per_loop, "period2_return_error"), colours, log_y=True)
    ax.set(xlabel="loop k", ylabel="||h_k - h_{k-2}|| / ||h_k|| (log)",
           title="Period-2 return error")
    if not radius.empty:
        _radius_panel(axes[("all", "rho")], radius, models, labels, colours)
    fs.figure_legend(fig, _model_handles(models, labels, colours, splits), "model")
    fig.suptitle(f"Oscillation diagnostics ({which})" + note)
    return fig


def _radius_panel(ax: plt.Axes, radius: pd.DataFrame, models: Sequence[str],
                  labels: dict[str, str], colours: dict[str, Any]) -> None:
    splits = fs.ordered(radius["split"])
    offsets = dict(zip(splits, np.linspace(-0.15, 0.15, len(splits)) if len(splits) > 1 else [0]))
    for i, model in enumerate(models):
        for split in splits:
            values = radius[(radius["model"] == model) & (radius["split"] == split)]["value"]
            if values.empty:
                continue
            mid, low, high = values.median(), values.quantile(0.025), values.quantile(0.975)
            ax.errorbar(mid, i + offsets[split], xerr=[[mid - low], [high - mid]], fmt="o",
                        color=colours[model], mfc=colours[model] if split == splits[0] else "w",
                        capsize=2)
    ax.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(models)), [labels[m] for m in models])
    ax.invert_yaxis()
    split_note = f"filled: {splits[0]}, open: {splits[1]}; " if len(splits) > 1 else ""
    ax.set(xlabel=f"spectral radius ρ(∂f/∂h) at final state ({split_note}ρ < 1: contractive)",
           ylabel="model", title="Spectral radius")


@fs.styled_figure
def fig_heatmaps(traces: pd.DataFrame) -> Figure:
    """Tokens x loop heatmaps of the distance to the final state (shared log colour scale, mean
    over samples), one per model x split; plus a row of mean halting depth per token when
    ``halt_depth`` rows exist."""
    validate_frame(traces, ["token", "loop", "metric", "value"])
    fs.need(traces, ["dist_to_final"], "fig_heatmaps")
    dist = fs.prepare(fs.metric(traces, "dist_to_final"))
    dist, which = fs.one_controller(dist[dist["token"] >= 0])
    depth = fs.prepare(fs.metric(traces, "halt_depth"))
    depth = depth[depth["token"] >= 0]
    splits, models, labels, note = fs.facets(dist)
    matrices = {key: part.pivot_table(index="token", columns="loop", values="value",
                                      aggfunc="mean") for key, part in dist.groupby(["split",
                                                                                     "model"])}
    matrices = {k: m.where(m > 0).dropna(axis=1, how="all") for k, m in matrices.items()}
    positive = np.concatenate([m.to_numpy().ravel() for m in matrices.values()])
    positive = positive[np.isfinite(positive)]
    low = positive.min() if positive.size else 1e-6
    norm = LogNorm(vmin=low, vmax=max(positive.max() if positive.size else 1.0, low * 10))
    rows = splits + (["halting depth"] if not depth.empty else [])
    fig, axes = fs.facet_grid(rows, models, panel=(2.9, 2.4))
    image = None
    for (row, model), ax in axes.items():
        if row == "halting depth":
            _halt_depth_panel(ax, depth[depth["model"] == model], labels[model])
            continue
        matrix = matrices.get((row, model))
        if matrix is None or matrix.empty:
            fs.empty_panel(ax)
            continue
        image = fs.matrix_image(ax, matrix, norm)
        ax.set_title(f"{labels[model]} · {row}")
    fs.outer_labels([a for (r, _), a in axes.items() if r != "halting depth"], "loop k",
                    "token position")
    if image is not None:
        fig.colorbar(image, ax=list(axes.values()), label="||h_k - h_K|| (log)", shrink=0.6)
    if not depth.empty:
        colours = fs.controller_colours(depth["controller"])
        fs.figure_legend(fig, [fs.handle(c, col) for c, col in colours.items()]
                         + fs.split_handles(fs.ordered(depth["split"])), "halting depth")
    fig.suptitle(f"Distance to the final state per token and loop ({which})" + note)
    return fig


def _halt_depth_panel(ax: plt.Axes, depth: pd.DataFrame, label: str) -> None:
    if depth.empty:
        fs.empty_panel(ax, "no halting depth")
        return
    colours = fs.controller_colours(depth["controller"])
    for (controller, split), part in depth.groupby(["controller", "split"]):
        mean = part.groupby("token")["value"].mean()
        ax.plot(mean.index, mean.to_numpy(), color=colours[controller], marker="o", markersize=3,
                linestyle=fs.SPLIT_DASH.get(split, "-"))
    fs.integer_ticks(ax)
    ax.set(title=f"{label} · halting depth", xlabel="token position",
           ylabel="mean loops used")


@fs.styled_figure
def fig_phase_portraits(traces: pd.DataFrame, max_tokens: int = 8) -> Figure:
    """PCA phase portraits: each token's (pc1, pc2) path over loops for the first sample, one
    panel per model x split (colour = token position; circle = first loop, star = last)."""
    validate_frame(traces, ["sample", "token", "loop", "metric", "value"])
    fs.need(traces, ["pc1", "pc2"], "fig_phase_portraits")
    pcs = fs.prepare(traces[traces["metric"].isin(["pc1", "pc2"]) & (traces["token"] >= 0)])
    pcs, which = fs.one_controller(pcs)
    wide = pcs.pivot_table(index=["model", "split", "sample", "token", "loop"], columns="metric",
                           values="value", aggfunc="mean").reset_index().dropna()
    splits, models, labels, note = fs.facets(wide)
    norm = Normalize(vmin=0, vmax=max(int(wide["token"].max()), 1))
    fig, axes = fs.facet_grid(splits, models, panel=(2.9, 2.6))
    for (split, model), ax in axes.items():
        part = wide[(wide["model"] == model) & (wide["split"] == split)]
        if part.empty:
            fs.empty_panel(ax)
            continue
        part = part[part["sample"] == part["sample"].min()]
        tokens = sorted(part["token"].unique())
        for token in tokens[:: max(1, int(np.ceil(len(tokens) / max_tokens)))]:
            path = part[part["token"] == token].sort_values("loop")
            colour = plt.get_cmap("viridis")(norm(token))
            ax.plot(path["pc1"], path["pc2"], color=colour, linewidth=1)
            ax.plot(path["pc1"].iloc[:1], path["pc2"].iloc[:1], "o", color=colour, markersize=3)
            ax.plot(path["pc1"].iloc[-1:], path["pc2"].iloc[-1:], "*", color=colour,
                    markersize=7)
        ax.set_title(f"{labels[model]} · {split}")
        ax.locator_params(nbins=5)
    fs.outer_labels(axes.values(), "PC 1 (tail-fitted)", "PC 2 (tail-fitted)")
    fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=list(axes.values()),
                 label="token position", shrink=0.6)
    fs.figure_legend(fig, [fs.handle("first loop", "0.3", "none", "o"),
                           fs.handle("last loop", "0.3", "none", "*")])
    fig.suptitle(f"Phase portraits of the first sample ({which})" + note)
    return fig


@fs.styled_figure
def fig_verdicts(samples: pd.DataFrame) -> Figure:
    """Share of trajectory verdicts (converged, periodic, ...) per controller x loop budget,
    one panel per model x split."""
    validate_frame(samples, ["controller", "budget", "label"])
    if samples.empty:
        raise ValueError("fig_verdicts needs at least one sample row")
    data = fs.prepare(samples)
    splits, models, labels, note = fs.facets(data)
    groups = sorted(data[["controller", "budget"]].drop_duplicates().itertuples(index=False),
                    key=lambda g: (fs.controller_rank(g[0]), g[1]))
    names = [f"{fs.short_controller(c)} K={b}" for c, b in groups]
    verdicts = [v for v in VERDICT_ORDER if v in set(data["label"])]
    verdicts += sorted(set(data["label"].astype(str)) - set(verdicts))
    colours = fs.series_colours(verdicts)
    fig, axes = fs.facet_grid(splits, models, panel=(2.6, 0.3 * len(groups) + 1.0), sharex=True,
                              sharey=True)
    for (split, model), ax in axes.items():
        part = data[(data["model"] == model) & (data["split"] == split)]
        share = pd.crosstab([part["controller"], part["budget"]], part["label"],
                            normalize="index").reindex(groups).fillna(0.0)
        left = np.zeros(len(groups))
        for verdict in verdicts:
            width = share[verdict].to_numpy() if verdict in share.columns else 0 * left
            ax.barh(range(len(groups)), width, left=left, color=colours[verdict], height=0.8)
            left += width
        ax.set_yticks(range(len(groups)), names)
        ax.set_ylim(len(groups) - 0.5, -0.5)
        ax.set(xlim=(0, 1), title=f"{labels[model]} · {split}")
    fs.outer_labels(axes.values(), "share of samples", "controller · budget")
    fs.figure_legend(fig, [fs.handle(v, colours[v], "none", "s") for v in verdicts], "verdict")
    fig.suptitle("Trajectory verdicts" + note)
    return fig


@fs.styled_figure
def fig_depth_histograms(samples: pd.DataFrame) -> Figure:
    """Exit depth distribution per difficulty level: for each adaptive controller (rows, at its
    largest budget) and model (columns), the share of samples of each difficulty that exit at
    each depth (rows of the image sum to 1), with the mean depth per difficulty marked."""
    validate_frame(samples, ["controller", "budget", "difficulty", "depth"])
    if samples.empty:
        raise ValueError("fig_depth_histograms needs at least one sample row")
    data = fs.prepare(samples)
    adaptive = [c for c in data["controller"].unique() if c != "fixed"]
    data = fs.largest_budget(data[data["controller"].isin(adaptive)] if adaptive else data)
    controllers = sorted(data["controller"].unique(), key=fs.controller_rank)
    _, models, labels, note = fs.facets(data)
    difficulties = sorted(data["difficulty"].unique())
    fig, axes = fs.facet_grid(controllers, models, panel=(2.7, 0.22 * len(difficulties) + 1.0))
    norm, image = Normalize(0, 1), None
    for (controller, model), ax in axes.items():
        part = data[(data["model"] == model) & (data["controller"] == controller)]
        if part.empty:
            fs.empty_panel(ax)
            continue
        budget = int(part["budget"].max())
        share = pd.crosstab(part["difficulty"], part["depth"], normalize="index")
        share = share.reindex(index=difficulties, columns=range(1, budget + 1)).fillna(0.0)
        image = fs.matrix_image(ax, share, norm, cmap="Blues", origin="lower", most_y=12)
        mean = part.groupby("difficulty")["depth"].mean().reindex(difficulties)
        ax.plot(mean.to_numpy() - 1, range(len(difficulties)), "o", color="w", mec="k",
                markersize=4)
        _split_boundary(ax, part, difficulties)
        ax.set_title(f"{labels[model]} · {fs.short_controller(controller)} K={budget}")
    fs.outer_labels(axes.values(), "exit depth (loops used)", "difficulty")
    if image is not None:
        fig.colorbar(image, ax=list(axes.values()), label="share of samples at that difficulty",
                     shrink=0.6)
    fs.figure_legend(fig, [fs.handle("mean depth", "k", "none", "o", filled=False),
                           fs.handle("val | hard boundary", "0.5", "--")])
    fig.suptitle("Exit depth per difficulty (val and hard samples pooled)" + note)
    return fig


def _split_boundary(ax: plt.Axes, part: pd.DataFrame, difficulties: Sequence[Any]) -> None:
    """Dashed line between the val and hard difficulty levels when they do not overlap."""
    levels = {s: set(part[part["split"] == s]["difficulty"]) for s in ("val", "hard")}
    if levels["val"] and levels["hard"] and max(levels["val"]) < min(levels["hard"]):
        edge = max(i for i, d in enumerate(difficulties) if d in levels["val"])
        ax.axhline(edge + 0.5, color="0.5", linestyle="--", linewidth=1)


@fs.styled_figure
def fig_representation(results: pd.DataFrame) -> Figure:
    """Effective rank, attention JS and logit-lens KL per loop (colour = model, line style =
    split), and a row of CKA-between-loops heatmaps, one per model (first split); panels whose
    metric is absent are left out."""
    validate_frame(results, ["loop", "metric", "value"])
    data = fs.prepare(results)
    cka = data[data["metric"].astype(str).str.startswith("cka@")]
    lines = [m for m in ("effective_rank", "attention_js", "logit_lens_kl")
             if not fs.metric(data, m).empty]
    if not lines and cka.empty:
        raise ValueError("fig_representation needs effective_rank, cka@<j>, attention_js or "
                         "logit_lens_kl rows")
    data, which = fs.one_controller(data[data["metric"].isin(lines) | data.index.isin(cka.index)])
    splits, models, labels, note = fs.facets(data)
    colours = fs.series_colours(models)
    cka_models = models[:fs.MAX_COLS] if not cka.empty else []
    columns = max(len(lines), len(cka_models))
    fig = plt.figure(figsize=(min(fs.MAX_WIDTH, 3.2 * columns + fs.LEGEND_WIDTH + 0.6),
                              2.9 * (bool(lines) + bool(cka_models)) + 0.6), layout="constrained")
    grid = fig.add_gridspec(bool(lines) + bool(cka_models), 1)
    if lines:
        _representation_lines(fig, grid[0], data, lines, colours)
    if cka_models:
        _cka_row(fig, grid[-1], data, cka_models, labels, splits[0])
    fs.figure_legend(fig, _model_handles(models, labels, colours, splits), "model")
    fig.suptitle(f"Representation across loops ({which})" + note)
    return fig


def _representation_lines(fig: Figure, cell: Any, data: pd.DataFrame, lines: Sequence[str],
                          colours: dict[str, Any]) -> None:
    text = {"effective_rank": ("effective rank (Roy & Vetterli)", "Effective rank", False),
            "attention_js": ("JS to loop k-1 (nats)", "Attention divergence", False),
            "logit_lens_kl": ("KL(p_final || p_k) (nats, log)", "Logit lens", True)}
    sub = cell.subgridspec(1, len(lines))
    for i, name in enumerate(lines):
        ax = fig.add_subplot(sub[0, i])
        _per_loop_lines(ax, fs.metric(data, name), colours, log_y=text[name][2])
        ax.set(xlabel="loop k", ylabel=text[name][0], title=text[name][1])


def _cka_row(fig: Figure, cell: Any, data: pd.DataFrame, models: Sequence[str],
             labels: dict[str, str], split: str) -> None:
    cka = data[data["metric"].astype(str).str.startswith("cka@") & (data["split"] == split)]
    cka = cka.assign(other=cka["metric"].str[4:].astype(int),
                     value=pd.to_numeric(cka["value"], errors="coerce"))
    sub = cell.subgridspec(1, len(models))
    axes, image = [], None
    for i, model in enumerate(models):
        ax = fig.add_subplot(sub[0, i])
        axes.append(ax)
        matrix = cka[cka["model"] == model].pivot_table(index="loop", columns="other",
                                                        values="value", aggfunc="mean")
        if matrix.empty:
            fs.empty_panel(ax)
            continue
        image = fs.matrix_image(ax, matrix, Normalize(vmin=0, vmax=1), most=6)
        ax.set(xlabel="loop j", ylabel="loop i" if i == 0 else "",
               title=f"CKA between loops: {labels[model]} · {split}")
        if i:
            ax.tick_params(labelleft=False)
            ax.set_ylabel("loop i")
    if image is not None:
        fig.colorbar(image, ax=axes, label="linear CKA", shrink=0.8)
