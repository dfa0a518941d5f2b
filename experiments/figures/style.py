"""Layout and encoding helpers shared by ``experiments.figures``: small multiples, one legend per
figure, and fixed visual encodings so every figure reads the same way.

Conventions (Tufte's small multiples; colour-blind-safe palette from seaborn's ``colorblind``):

* one panel per model (``run``), wrapped after ``MAX_COLS`` columns, and one panel row per
  evaluation split (``val`` first, then ``hard``) where a figure shows both;
* colour encodes one variable with few levels (controller or model); the ``fixed`` controller is
  always near-black, the reference every other controller is compared with;
* line style encodes the split (``val`` solid, ``hard`` dashed) when both share an axes;
* one deduplicated legend per figure, outside the panels (``loc="outside right upper"`` under
  constrained layout), and one colour bar per figure for images that share a scale;
* drawing uses plain matplotlib calls (no seaborn calls that re-layout the whole figure).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never windows

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments.results import validate_frame  # noqa: E402

PALETTE = "colorblind"
FIXED_COLOUR = "0.15"
MAX_WIDTH = 16.0  # inches
MAX_COLS = 5  # panels per row before wrapping
LEGEND_WIDTH = 2.0  # inches kept free for the figure legend / colour bar
SPLIT_ORDER = ["val", "hard", "train"]
SPLIT_DASH = {"val": "-", "hard": "--", "train": ":"}
CONTROLLER_ORDER = ["fixed", "convergence", "solver", "act", "pondernet", "ouro_gate",
                    "halt_token", "q_halt"]
STYLE = {"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "legend.fontsize": 8.5, "legend.title_fontsize": 9,
         "figure.titlesize": 11, "axes.spines.top": False, "axes.spines.right": False}


@contextlib.contextmanager
def styled() -> Iterator[None]:
    """Context with the figure font sizes (readable at the saved size)."""
    with plt.rc_context(STYLE):
        yield


def ordered(values: Iterable[Any], order: Sequence[str] = SPLIT_ORDER) -> list[Any]:
    """Unique ``values``, those named in ``order`` first (in that order), the rest sorted."""
    unique = list(dict.fromkeys(values))
    known = [v for v in order if v in unique]
    return known + sorted((v for v in unique if v not in known), key=str)


def controller_rank(name: str) -> tuple[int, str]:
    """Sort key: fixed, convergence criteria, solver, then the learned halting controllers."""
    for rank, family in enumerate(CONTROLLER_ORDER):
        if str(name).startswith(family):
            return rank, str(name)
    return len(CONTROLLER_ORDER), str(name)


def controller_colours(names: Iterable[str]) -> dict[str, Any]:
    """Colour per controller: ``fixed`` near-black, the others the colour-blind palette."""
    names = sorted(set(names), key=controller_rank)
    others = [n for n in names if n != "fixed"]
    colours = dict(zip(others, sns.color_palette(PALETTE, max(len(others), 1))))
    if "fixed" in names:
        colours["fixed"] = FIXED_COLOUR
    return {n: colours[n] for n in names}


def series_colours(names: Sequence[str]) -> dict[str, Any]:
    """Colour-blind palette colours for ``names`` in the given order."""
    return dict(zip(names, sns.color_palette(PALETTE, max(len(names), 1))))


def short_controller(name: str) -> str:
    """``convergence_residual`` -> ``conv_residual`` (panel titles and tick labels)."""
    return str(name).replace("convergence_", "conv_")


def run_labels(runs: Iterable[str]) -> dict[str, str]:
    """Short model labels: drop the ``-``-separated parts every run name shares.

    ``parallel_loop-fixed-L2`` next to ``parallel_loop-fixed-L3`` becomes ``L2``; a single run
    keeps its full name.
    """
    runs = list(dict.fromkeys(str(r) for r in runs))
    parts = [r.split("-") for r in runs]
    if len(runs) < 2 or len({len(p) for p in parts}) != 1:
        return {r: r for r in runs}
    keep = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    return {r: "-".join(p[i] for i in keep) for r, p in zip(runs, parts)}


def facet_grid(rows: Sequence[Any], cols: Sequence[Any], panel: tuple[float, float] = (3.0, 2.3),
               legend: bool = True, sharex: bool = False, sharey: bool = False,
               ) -> tuple[Figure, dict[tuple[Any, Any], plt.Axes]]:
    """A grid with one panel per (row, col) key, columns wrapped after ``MAX_COLS``.

    Returns:
        The figure and a dict ``(row_key, col_key) -> Axes``; grid cells without a key are removed.
    """
    n_cols = min(len(cols), MAX_COLS)
    wraps = math.ceil(len(cols) / n_cols)
    n_rows = len(rows) * wraps
    spare = LEGEND_WIDTH if legend else 0.4
    width = min(MAX_WIDTH, n_cols * panel[0] + spare + 0.6)
    height = min(n_rows * panel[1] + 0.8, 13.0)
    fig, grid = plt.subplots(n_rows, n_cols, figsize=(width, height), squeeze=False,
                             layout="constrained", sharex=sharex, sharey=sharey)
    axes: dict[tuple[Any, Any], plt.Axes] = {}
    for r, row in enumerate(rows):
        for c, col in enumerate(cols):
            axes[(row, col)] = grid[r * wraps + c // n_cols, c % n_cols]
    used = {id(ax) for ax in axes.values()}
    for ax in grid.ravel():
        if id(ax) not in used:
            fig.delaxes(ax)
    return fig, axes


def outer_labels(axes: Iterable[plt.Axes], xlabel: str, ylabel: str) -> None:
    """``ylabel`` on each row's first visible panel, ``xlabel`` on each column's lowest one;
    tick labels are kept on every panel whose neighbour below is absent."""
    axes = [ax for ax in axes if ax.axison]
    for ax in axes:
        spec = ax.get_subplotspec()
        row, col = spec.rowspan.start, spec.colspan.start
        grid = [o for o in axes if o.get_subplotspec().get_gridspec() is spec.get_gridspec()]
        same_col = [o for o in grid if o.get_subplotspec().colspan.start == col]
        same_row = [o for o in grid if o.get_subplotspec().rowspan.start == row]
        if row == max(o.get_subplotspec().rowspan.start for o in same_col):
            ax.set_xlabel(xlabel)
            ax.tick_params(labelbottom=True)
        if col == min(o.get_subplotspec().colspan.start for o in same_row):
            ax.set_ylabel(ylabel)
            ax.tick_params(labelleft=True)


def empty_panel(ax: plt.Axes, text: str = "not evaluated") -> None:
    """Mark a facet without data (no axes frame, a short note)."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", color="0.5", transform=ax.transAxes)


def handle(label: str, color: Any = "0.3", linestyle: str = "-", marker: str | None = None,
           filled: bool = True) -> Line2D:
    """A legend proxy artist."""
    face = color if filled else "none"
    return Line2D([], [], color=color, linestyle=linestyle, marker=marker, markersize=6,
                  markerfacecolor=face, label=label)


def split_handles(splits: Sequence[str]) -> list[Line2D]:
    """Line-style legend entries for the splits, when more than one shares an axes."""
    if len(splits) < 2:
        return []
    return [handle(f"{s} split", "0.4", SPLIT_DASH.get(s, "-.")) for s in splits]


def figure_legend(fig: Figure, handles: Sequence[Line2D], title: str | None = None) -> None:
    """One deduplicated legend for the whole figure, right of the panels."""
    unique = list({h.get_label(): h for h in handles}.values())
    if unique:
        fig.legend(handles=unique, loc="outside right upper", title=title, frameon=False)


def integer_ticks(ax: plt.Axes, axis: str = "x", nbins: int = 6) -> None:
    """At most ``nbins`` integer ticks on ``axis``."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(nbins=nbins, integer=True))


def quantile_lines(df: pd.DataFrame, by: Sequence[str], x: str = "loop") -> pd.DataFrame:
    """Median and 2.5/97.5 percentiles of ``value`` per ``by`` + ``x``, one row per point."""
    grouped = df.groupby([*by, x])["value"]
    out = grouped.quantile([0.025, 0.5, 0.975]).unstack()
    out.columns = ["low", "median", "high"]
    return out.reset_index()


def band_line(ax: plt.Axes, part: pd.DataFrame, color: Any, linestyle: str = "-",
              x: str = "loop", band: bool = True) -> None:
    """Draw a median line with its percentile band (``quantile_lines`` rows of one series)."""
    part = part.sort_values(x)
    ax.plot(part[x], part["median"], color=color, linestyle=linestyle, linewidth=1.4,
            marker="o", markersize=2.5)
    if band and len(part) > 1:
        ax.fill_between(part[x], part["low"], part["high"], color=color, alpha=0.15,
                        linewidth=0)


def matrix_image(ax: plt.Axes, matrix: pd.DataFrame, norm: Any, cmap: str = "viridis",
                 most: int = 7, origin: str = "upper", most_y: int | None = None) -> Any:
    """Draw ``matrix`` as an image (no colour bar); at most ``most`` tick labels on x and
    ``most_y`` (default ``most``) on y.

    (``seaborn.heatmap`` redraws the whole figure per call to check label overlap; too slow.)
    """
    image = ax.imshow(matrix.to_numpy(dtype=float), aspect="auto", cmap=cmap, norm=norm,
                      interpolation="nearest", origin=origin)
    for set_ticks, labels, limit in ((ax.set_xticks, matrix.columns, most),
                                     (ax.set_yticks, matrix.index, most_y or most)):
        step = max(1, int(np.ceil(len(labels) / limit)))
        positions = list(range(0, len(labels), step))
        set_ticks(positions, [str(labels[i]) for i in positions])
    return image


def limit_runs(runs: Sequence[str], limit: int = 2 * MAX_COLS) -> tuple[list[str], str]:
    """At most ``limit`` runs, and a note for the title when some were left out."""
    runs = list(runs)
    if len(runs) <= limit:
        return runs, ""
    return runs[:limit], f" (first {limit} of {len(runs)} models)"


# --- data helpers shared by the figure modules ---

def styled_figure(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with styled():
            return draw(*args, **kwargs)
    return wrapper


def metric(df: pd.DataFrame, name: str) -> pd.DataFrame:
    out = df[df["metric"] == name].copy()
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    return out[np.isfinite(out["value"])]


def need(df: pd.DataFrame, metrics: Sequence[str], what: str) -> None:
    validate_frame(df, ["metric", "value"])
    if not any((df["metric"] == m).any() for m in metrics):
        raise ValueError(f"{what} needs metric(s) {list(metrics)}; table has "
                         f"{sorted(df['metric'].unique())[:20]}")


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``model`` (the facet key) and fill absent ``split``/``controller`` columns."""
    df = df.copy()
    if "split" not in df.columns:
        df["split"] = "all"
    if "controller" not in df.columns:
        df["controller"] = "all"
    run = df["run"].astype(str) if "run" in df.columns else None
    if "arch" in df.columns and (run is None or df.groupby("run")["arch"].nunique().max() > 1):
        df["model"] = df["arch"].astype(str) if run is None else run + "-" + df["arch"].astype(str)
    else:
        df["model"] = run if run is not None else "all"
    return df


def largest_budget(df: pd.DataFrame, keys: Sequence[str] = ("model", "controller")
                    ) -> pd.DataFrame:
    """Rows of each (model, controller)'s largest budget (the least truncated trajectory)."""
    if "budget" not in df.columns or df.empty:
        return df
    top = df.groupby(list(keys))["budget"].transform("max")
    return df[df["budget"] == top]


def one_controller(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The ``fixed`` controller's rows (else the first controller's) at the largest budget."""
    names = sorted(df["controller"].unique(), key=controller_rank)
    name = "fixed" if "fixed" in names else names[0]
    part = largest_budget(df[df["controller"] == name])
    budget = f", K={part['budget'].max()}" if "budget" in part.columns else ""
    return part, f"{name} controller{budget}"


def facets(df: pd.DataFrame) -> tuple[list[str], list[str], dict[str, str], str]:
    """Splits (rows), models (columns), short model labels and a title note if models were cut."""
    models, note = limit_runs(ordered(df["model"], []))
    return ordered(df["split"]), models, run_labels(models), note


def quality(results: pd.DataFrame) -> tuple[str, str]:
    if (results["metric"] == "accuracy").any():
        return "accuracy", "accuracy"
    if (results["metric"] == "bits_per_byte").any():
        return "bits_per_byte", "bits per byte (lower is better)"
    raise ValueError("needs metric 'accuracy' or 'bits_per_byte' in results")


