"""Figures drawn from a run's tables (``experiments.schema``); each ``fig_*`` returns a Figure.

Which rows each figure reads (metric names are the ``metric`` column):

=========================  ==========  ======================================================
figure                     table       metrics
=========================  ==========  ======================================================
``convergence_traces``     traces      ``residual`` (token -1); optional tolerance argument
``oscillation``            results     ``cos_prev``, ``period2_return_error``; optional
                                       ``spectral_radius`` (or samples' ``spectral_radius``)
``heatmaps``               traces      ``dist_to_final`` (token >= 0); optional ``halt_depth``
                                       (loops used by a token, token >= 0)
``phase_portraits``        traces      ``pc1``, ``pc2`` (token >= 0)
``verdicts``               samples     ``label`` per controller x budget
``representation``         results     any of ``effective_rank``, ``cka@<j>``,
                                       ``attention_js``, ``logit_lens_kl``
``gain_cost``              results     ``fixed`` controller: ``accuracy`` or ``bits_per_byte``;
                                       optional ``flops_per_token``
``accuracy_vs_loops``      results     ``accuracy`` (or ``bits_per_byte``), ``mean_loops``;
                                       optional ``flops_per_token``
=========================  ==========  ======================================================

Lines are told apart by a *series* label built from the identifying columns that vary in the
table (arch, controller, budget, split, ...), so the same code serves one run and a whole sweep.
Colours come from seaborn's colour-blind palette; legends sit outside the axes. The trajectory
pictures follow Huginn's study (Geiping et al. 2025, arXiv 2502.05171): token x step heatmaps of
the distance to the final state with a log colour scale, and PCA phase portraits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never windows

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments.results import load_run, save_figure, validate_frame  # noqa: E402

log = logging.getLogger(__name__)
PALETTE = "colorblind"
SERIES_KEYS = ("arch", "objective", "train_loops", "controller", "budget", "split", "run", "task")
VERDICT_ORDER = ["converged", "converging", "periodic", "quasi_periodic", "chaotic", "aperiodic",
                 "drifting", "diverging"]
MAX_PANELS = 4


def _series(df: pd.DataFrame, keys: Sequence[str] = SERIES_KEYS) -> pd.Series:
    """A readable label per row from the identifying columns that take more than one value."""
    varying = [k for k in keys if k in df.columns and df[k].nunique(dropna=False) > 1]
    for key in reversed(list(varying)):  # drop keys implied by the others (e.g. run names)
        rest = [k for k in varying if k != key]
        if rest and len(df[rest].drop_duplicates()) == len(df[varying].drop_duplicates()):
            varying = rest
    if not varying:
        first = next((k for k in ("controller", "arch") if k in df.columns), None)
        varying = [first] if first else []
    if not varying:
        return pd.Series("all", index=df.index)
    parts = [df[k].astype(str) if k != "budget" else "K=" + df[k].astype(str) for k in varying]
    label = parts[0]
    for part in parts[1:]:
        label = label + " · " + part
    return label


def _metric(df: pd.DataFrame, name: str) -> pd.DataFrame:
    out = df[df["metric"] == name].copy()
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    return out[np.isfinite(out["value"])]


def _need(df: pd.DataFrame, metrics: Sequence[str], what: str) -> None:
    validate_frame(df, ["metric", "value"])
    if not any((df["metric"] == m).any() for m in metrics):
        raise ValueError(f"{what} needs metric(s) {list(metrics)}; table has "
                         f"{sorted(df['metric'].unique())[:20]}")


def _legend_outside(ax: plt.Axes, title: str | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        ax.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  fontsize="small", frameon=False)


def _panels(n: int, width: float = 4.6, height: float = 3.4) -> tuple[Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, n, figsize=(width * n + 1.5, height), squeeze=False,
                             layout="constrained")
    return fig, list(axes[0])


def _line(ax: plt.Axes, df: pd.DataFrame, y_label: str, title: str, log_y: bool = False,
          band: bool = True) -> None:
    data = df.assign(series=_series(df))
    sns.lineplot(data=data, x="loop", y="value", hue="series", ax=ax, palette=PALETTE,
                 estimator="median", errorbar=("pi", 95) if band else None, marker="o",
                 markersize=3)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel="loop k", ylabel=y_label, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(ax)


def fig_convergence_traces(traces: pd.DataFrame, tol: float | None = None) -> Figure:
    """Relative residual per loop, median with a 95% percentile band over samples, per controller
    (hue) and one panel per architecture; dashed line at the tolerance ``tol`` when given."""
    validate_frame(traces, ["loop", "metric", "value"])
    _need(traces, ["residual"], "fig_convergence_traces")
    data = _metric(traces, "residual")
    if "token" in data.columns:
        data = data[data["token"] == -1] if (data["token"] == -1).any() else data
    data = data[data["value"] > 0]
    archs = sorted(data["arch"].unique()) if "arch" in data.columns else [None]
    fig, axes = _panels(min(len(archs), MAX_PANELS))
    for ax, arch in zip(axes, archs):
        part = data if arch is None else data[data["arch"] == arch]
        keys = [k for k in SERIES_KEYS if k != "arch"]
        sns.lineplot(data=part.assign(series=_series(part, keys)), x="loop", y="value",
                     hue="series", ax=ax, palette=PALETTE, estimator="median",
                     errorbar=("pi", 95))
        ax.set_yscale("log")
        if tol is not None:
            ax.axhline(tol, color="0.3", linestyle="--", linewidth=1, label=f"tolerance {tol:g}")
        ax.set(xlabel="loop k", ylabel="relative residual ||Δ||/||h|| (log)",
               title=f"Convergence: {arch} (median, 95% band)" if arch else "Convergence")
        _legend_outside(ax)
    return fig


def fig_oscillation(results: pd.DataFrame, samples: pd.DataFrame | None = None) -> Figure:
    """Successive-update cosine and period-2 return error per loop, and the spectral radius of
    the loop map at the final state per run (from results, else from ``samples``)."""
    validate_frame(results, ["loop", "metric", "value"])
    for name in ("cos_prev", "period2_return_error"):
        _need(results, [name], "fig_oscillation")
    radius = _metric(results, "spectral_radius")
    if radius.empty and samples is not None and "spectral_radius" in samples.columns:
        radius = samples.assign(value=pd.to_numeric(samples["spectral_radius"], errors="coerce"))
        radius = radius[np.isfinite(radius["value"])]
    fig, axes = _panels(3 if not radius.empty else 2)
    cos = _metric(results, "cos_prev")
    _line(axes[0], cos, "cos(Δ_k, Δ_{k-1})", "Successive-update cosine")
    axes[0].axhline(-1, color="0.6", linewidth=0.8, linestyle=":")
    axes[0].set_ylim(-1.05, 1.05)
    _line(axes[1], _metric(results, "period2_return_error"),
          "period-2 return ||h_k - h_{k-2}||/||h_k|| (log)", "Period-2 return error", log_y=True)
    if not radius.empty:
        keys = [k for k in SERIES_KEYS if k not in ("budget", "split")]
        data = radius.assign(series=_series(radius, keys))
        sns.pointplot(data=data, y="series", x="value", hue="series", ax=axes[2],
                      palette=PALETTE, errorbar=("pi", 95), linestyle="none", legend=False)
        axes[2].axvline(1.0, color="0.3", linestyle="--", linewidth=1)
        axes[2].set(xlabel="spectral radius ρ(∂f/∂h) at final state", ylabel="run",
                    title="Spectral radius (ρ < 1: contractive)")
    return fig


def _token_loop_matrix(part: pd.DataFrame) -> pd.DataFrame:
    return part.pivot_table(index="token", columns="loop", values="value", aggfunc="mean")


def fig_heatmaps(traces: pd.DataFrame) -> Figure:
    """Tokens x loop heatmaps of the distance to the final state (log colour, mean over samples),
    one per series, and the mean halting depth per token when ``halt_depth`` rows exist."""
    validate_frame(traces, ["token", "loop", "metric", "value"])
    _need(traces, ["dist_to_final"], "fig_heatmaps")
    dist = _metric(traces, "dist_to_final")
    dist = dist[dist["token"] >= 0]
    dist = dist.assign(series=_series(dist))
    names = list(dict.fromkeys(dist["series"]))[:MAX_PANELS]
    depth = _metric(traces, "halt_depth")
    depth = depth[depth["token"] >= 0]
    fig, axes = _panels(len(names) + (not depth.empty), width=4.4, height=3.8)
    for ax, name in zip(axes, names):
        matrix = _token_loop_matrix(dist[dist["series"] == name])
        positive = matrix.where(matrix > 0).dropna(axis=1, how="all")  # the last loop is 0
        low = np.nanmin(positive.to_numpy()) if positive.notna().any().any() else 1e-6
        high = max(np.nanmax(positive.to_numpy()) if positive.notna().any().any() else 1, low * 10)
        _matrix_image(ax, positive, LogNorm(vmin=low, vmax=high), "||h_k - h_K|| (log)")
        ax.set(xlabel="loop k", ylabel="token position", title=f"Distance to final: {name}")
    if not depth.empty:
        ax = axes[-1]
        data = depth.assign(series=_series(depth))
        sns.lineplot(data=data, x="token", y="value", hue="series", ax=ax, palette=PALETTE,
                     errorbar=("pi", 95), marker="o", markersize=3)
        ax.set(xlabel="token position", ylabel="halting depth (loops used)",
               title="Halting depth per token")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend_outside(ax)
    return fig


def _matrix_image(ax: plt.Axes, matrix: pd.DataFrame, norm: Any, label: str,
                  most: int = 12) -> None:
    """Draw ``matrix`` as an image with a colour bar; at most ``most`` tick labels per axis.

    (``seaborn.heatmap`` redraws the whole figure per call to check label overlap; too slow.)
    """
    image = ax.imshow(matrix.to_numpy(dtype=float), aspect="auto", cmap="viridis", norm=norm,
                      interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label=label)
    for set_ticks, labels in ((ax.set_xticks, matrix.columns), (ax.set_yticks, matrix.index)):
        step = max(1, int(np.ceil(len(labels) / most)))
        positions = list(range(0, len(labels), step))
        set_ticks(positions, [str(labels[i]) for i in positions])


def fig_phase_portraits(traces: pd.DataFrame, max_tokens: int = 8) -> Figure:
    """PCA phase portraits: each token's (pc1, pc2) path over loops for the first sample of each
    series (colour = token position; circle = h_0, star = last loop)."""
    validate_frame(traces, ["sample", "token", "loop", "metric", "value"])
    _need(traces, ["pc1", "pc2"], "fig_phase_portraits")
    pcs = traces[traces["metric"].isin(["pc1", "pc2"]) & (traces["token"] >= 0)]
    pcs = pcs.assign(series=_series(pcs))
    wide = pcs.pivot_table(index=["series", "sample", "token", "loop"], columns="metric",
                           values="value", aggfunc="mean").reset_index().dropna()
    names = list(dict.fromkeys(wide["series"]))[:MAX_PANELS]
    fig, axes = _panels(len(names), width=4.2, height=4.0)
    for ax, name in zip(axes, names):
        part = wide[wide["series"] == name]
        part = part[part["sample"] == part["sample"].min()]
        tokens = sorted(part["token"].unique())
        tokens = tokens[:: max(1, int(np.ceil(len(tokens) / max_tokens)))]
        colours = sns.color_palette("viridis", len(tokens))
        for colour, token in zip(colours, tokens):
            path = part[part["token"] == token].sort_values("loop")
            ax.plot(path["pc1"], path["pc2"], color=colour, linewidth=1, label=f"t={token}")
            ax.scatter(path["pc1"].iloc[:1], path["pc2"].iloc[:1], color=colour, marker="o", s=14)
            ax.scatter(path["pc1"].iloc[-1:], path["pc2"].iloc[-1:], color=colour, marker="*",
                       s=50)
        ax.set(xlabel="PC 1 (tail-fitted)", ylabel="PC 2 (tail-fitted)",
               title=f"Phase portrait: {name}")
        _legend_outside(ax, "token")
    return fig


def fig_verdicts(samples: pd.DataFrame) -> Figure:
    """Share of trajectory verdicts (converged, periodic, ...) per controller x loop budget."""
    validate_frame(samples, ["controller", "budget", "label"])
    if samples.empty:
        raise ValueError("fig_verdicts needs at least one sample row")
    keys = [k for k in ("arch", "controller", "budget", "split") if k in samples.columns]
    data = samples.assign(group=_series(samples, keys)).sort_values(keys)
    share = pd.crosstab(data["group"], data["label"], normalize="index")
    share = share.loc[list(dict.fromkeys(data["group"]))]  # numeric budget order, not text
    order = [v for v in VERDICT_ORDER if v in share.columns]
    share = share[order + sorted(set(share.columns) - set(order))]
    fig, axes = _panels(1, width=max(5.0, 0.7 * len(share) + 3), height=3.8)
    ax = axes[0]
    colours = dict(zip(share.columns, sns.color_palette(PALETTE, len(share.columns))))
    bottom = np.zeros(len(share))
    for label in share.columns:
        ax.bar(range(len(share)), share[label], bottom=bottom, color=colours[label], label=label)
        bottom += share[label].to_numpy()
    ax.set_xticks(range(len(share)), share.index, rotation=30, ha="right")
    ax.set(xlabel="controller · loop budget", ylabel="share of samples",
           title="Trajectory verdicts", ylim=(0, 1))
    _legend_outside(ax, "verdict")
    return fig


def fig_representation(results: pd.DataFrame) -> Figure:
    """Effective rank, CKA between loops (first series), attention JS and logit-lens KL per loop;
    panels whose metric is absent are left out."""
    validate_frame(results, ["loop", "metric", "value"])
    cka = results[results["metric"].astype(str).str.startswith("cka@")]
    present = {m: not _metric(results, m).empty
               for m in ("effective_rank", "attention_js", "logit_lens_kl")}
    if not cka.empty:
        present["cka"] = True
    if not any(present.values()):
        raise ValueError("fig_representation needs effective_rank, cka@<j>, attention_js or "
                         "logit_lens_kl rows")
    panels = [name for name in ("effective_rank", "cka", "attention_js", "logit_lens_kl")
              if present.get(name)]
    fig, axes = _panels(len(panels))
    labels = {"effective_rank": ("effective rank (Roy & Vetterli)", "Effective rank", False),
              "attention_js": ("Jensen-Shannon to loop k-1 (nats)", "Attention divergence", False),
              "logit_lens_kl": ("KL(p_final || p_k) (nats, log)", "Logit lens", True)}
    for ax, name in zip(axes, panels):
        if name == "cka":
            _cka_heatmap(ax, cka)
        else:
            _line(ax, _metric(results, name), labels[name][0], labels[name][1],
                  log_y=labels[name][2])
    return fig


def _cka_heatmap(ax: plt.Axes, cka: pd.DataFrame) -> None:
    cka = cka.assign(series=_series(cka), other=cka["metric"].str[4:].astype(int),
                     value=pd.to_numeric(cka["value"], errors="coerce"))
    first = cka["series"].iloc[0]
    matrix = cka[cka["series"] == first].pivot_table(index="loop", columns="other",
                                                     values="value", aggfunc="mean")
    _matrix_image(ax, matrix, Normalize(vmin=0, vmax=1), "linear CKA")
    ax.set(xlabel="loop j", ylabel="loop i", title=f"CKA between loops: {first}")


def _quality(results: pd.DataFrame) -> tuple[str, str]:
    if (results["metric"] == "accuracy").any():
        return "accuracy", "accuracy"
    if (results["metric"] == "bits_per_byte").any():
        return "bits_per_byte", "bits per byte (lower is better)"
    raise ValueError("needs metric 'accuracy' or 'bits_per_byte' in results")


def fig_gain_cost(results: pd.DataFrame) -> Figure:
    """Gain-cost curve of loop count for the ``fixed`` controller: quality vs loops (train loops
    when the table spans several, else the evaluation budget), and the marginal gain of each added
    loop against its added compute (FLOPs per token when recorded, else loops)."""
    validate_frame(results, ["controller", "budget", "metric", "value"])
    metric, label = _quality(results)
    fixed = results[results["controller"] == "fixed"]
    if fixed.empty:
        raise ValueError("fig_gain_cost needs rows of the 'fixed' controller")
    x = ("train_loops" if "train_loops" in fixed.columns and fixed["train_loops"].nunique() > 1
         else "budget")
    if x == "train_loops" and (fixed["budget"] == fixed["train_loops"]).any():
        fixed = fixed[fixed["budget"] == fixed["train_loops"]]  # each model at its own depth
    else:
        x = "budget"
    keys = [k for k in SERIES_KEYS if k not in (x, "controller", "run", "budget", "train_loops")]
    quality = _metric(fixed, metric).assign(series=lambda d: _series(d, keys))
    names = list(dict.fromkeys(quality["series"]))
    colours = dict(zip(names, sns.color_palette(PALETTE, len(names))))
    fig, axes = _panels(2)
    sns.lineplot(data=quality, x=x, y="value", hue="series", hue_order=names, ax=axes[0],
                 palette=colours, marker="o", errorbar=("pi", 95))
    axes[0].set(xlabel="train loops" if x == "train_loops" else "loops (fixed count)",
                ylabel=label, title="Quality vs loop count")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(axes[0])
    curve = quality.groupby(["series", x])["value"].mean().rename("quality").reset_index()
    flops = _metric(fixed, "flops_per_token")
    if not flops.empty:
        curve = curve.join(flops.groupby(x)["value"].mean().rename("cost"), on=x)
        scale, unit = (1e9, "GFLOPs") if curve["cost"].max() >= 1e9 else (1e6, "MFLOPs")
        curve["cost"] = curve["cost"] / scale
        cost_label = f"added compute ({unit} / token)"
    else:
        curve["cost"] = curve[x].astype(float)
        cost_label = "added loops"
    sign = -1.0 if metric == "bits_per_byte" else 1.0
    for name in names:
        part = curve[curve["series"] == name].sort_values(x)
        gain = sign * part["quality"].diff() / part[x].astype(float).diff()  # per added loop
        added = part["cost"].diff()
        axes[1].plot(added, gain, marker="o", color=colours[name], label=name)
        for prev, step, gx, gy in zip(part[x].iloc[:-1], part[x].iloc[1:], added.iloc[1:],
                                      gain.iloc[1:]):
            axes[1].annotate(f"{prev}→{step}", (gx, gy), fontsize="x-small", xytext=(3, 3),
                             textcoords="offset points")
    axes[1].axhline(0, color="0.6", linewidth=0.8)
    axes[1].set(xlabel=cost_label, ylabel=f"marginal gain in {metric} per added loop",
                title="Marginal gain vs added compute")
    _legend_outside(axes[1])
    return fig


def fig_accuracy_vs_loops(results: pd.DataFrame) -> Figure:
    """Quality against mean loops used (and FLOPs per token when recorded) for every controller,
    with the fixed-count sweep drawn as a line for reference."""
    validate_frame(results, ["controller", "budget", "metric", "value"])
    metric, label = _quality(results)
    index = [c for c in ("run", "arch", "train_loops", "controller", "budget", "split")
             if c in results.columns]
    wanted = [metric, "mean_loops", "flops_per_token"]
    wide = (results[results["metric"].isin(wanted)]
            .assign(value=lambda d: pd.to_numeric(d["value"], errors="coerce"))
            .pivot_table(index=index, columns="metric", values="value", aggfunc="mean")
            .reset_index())
    if "mean_loops" not in wide.columns or metric not in wide.columns:
        raise ValueError(f"fig_accuracy_vs_loops needs metrics {metric!r} and 'mean_loops'")
    wide = wide.dropna(subset=[metric, "mean_loops"])
    xs = [("mean_loops", "mean loops used")]
    if "flops_per_token" in wide.columns and wide["flops_per_token"].notna().any():
        scale, unit = (1e9, "GFLOPs") if wide["flops_per_token"].max() >= 1e9 else (1e6, "MFLOPs")
        wide["compute"] = wide["flops_per_token"] / scale
        xs.append(("compute", f"compute ({unit} / token)"))
    keys = [k for k in ("arch", "objective", "train_loops", "split") if k in wide.columns]
    wide["series"] = wide["controller"].astype(str)
    if keys:
        wide["series"] = wide["series"] + " · " + _series(wide, keys)
    fig, axes = _panels(len(xs))
    for ax, (column, x_label) in zip(axes, xs):
        fixed = wide[wide["controller"] == "fixed"].sort_values(column)
        runs = ["series", "run"] if "run" in fixed.columns else ["series"]
        for (name, *_), part in fixed.groupby(runs):
            ax.plot(part[column], part[metric], color="0.4", linestyle="--", linewidth=1,
                    label=f"{name} sweep")
        sns.scatterplot(data=wide, x=column, y=metric, hue="series", style="series", ax=ax,
                        palette=PALETTE, s=50)
        ax.set(xlabel=x_label, ylabel=label, title=f"{label.split(' (')[0]} vs {x_label}")
        _legend_outside(ax)
    return fig


FIGURES: dict[str, tuple[str, Callable[..., Figure]]] = {
    "convergence_traces": ("traces", fig_convergence_traces),
    "oscillation": ("results", fig_oscillation),
    "heatmaps": ("traces", fig_heatmaps),
    "phase_portraits": ("traces", fig_phase_portraits),
    "verdicts": ("samples", fig_verdicts),
    "representation": ("results", fig_representation),
    "gain_cost": ("results", fig_gain_cost),
    "accuracy_vs_loops": ("results", fig_accuracy_vs_loops),
}


def _tolerance(results: pd.DataFrame) -> float | None:
    tol = _metric(results, "tolerance") if "metric" in results.columns else results.iloc[0:0]
    return float(tol["value"].iloc[0]) if not tol.empty else None


def draw_all(run_dir: str | os.PathLike, skipped: dict[str, str] | None = None) -> list[Path]:
    """Draw every figure the run has data for into ``run_dir/figures/<name>.png`` (atomically).

    Figures whose table or metrics are absent are skipped, not drawn empty; their names and the
    reason are logged and, when ``skipped`` is a dict, recorded there.

    Returns:
        Paths of the PNG files written.
    """
    tables = load_run(run_dir)
    written: list[Path] = []
    for name, (table, draw) in FIGURES.items():
        reason = _draw_one(name, table, draw, tables, Path(run_dir), written)
        if reason is not None:
            log.info("figure %s skipped: %s", name, reason)
            if skipped is not None:
                skipped[name] = reason
    return written


def _draw_one(name: str, table: str, draw: Callable[..., Figure], tables: dict[str, Any],
              run_dir: Path, written: list[Path]) -> str | None:
    frame = tables.get(table)
    if frame is None or frame.empty:
        return f"{table}.parquet absent or empty"
    kwargs: dict[str, Any] = {}
    if name == "convergence_traces":
        kwargs["tol"] = _tolerance(tables["results"])
    if name == "oscillation":
        kwargs["samples"] = tables.get("samples")
    try:
        fig = draw(frame, **kwargs)
    except ValueError as err:  # the figure's data is not in this run
        return str(err)
    try:
        written.append(save_figure(fig, run_dir / "figures" / f"{name}.png"))
    finally:
        plt.close(fig)
    return None
