"""Drawing every figure of a run into ``run_dir/figures`` (``draw_all``), in parallel processes.

Each figure is rendered to PNG bytes in memory; files are written only once every figure has been
drawn, so a figure that fails leaves the existing files untouched. With ``workers > 1`` the main
process and ``workers - 1`` helper processes take figures from one shared counter, most expensive
first (``DRAW_COST``), so the slowest figure starts first and no process idles while another draws
two; each figure is drawn by exactly the code the sequential path runs, so the bytes are the same.
Helpers are forked where the platform allows it (matplotlib and the tables are already in
memory; a spawned helper re-imports them, about two seconds).
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.figures import style as fs
from experiments.figures.dynamics import (
    fig_convergence_traces,
    fig_depth_histograms,
    fig_heatmaps,
    fig_oscillation,
    fig_phase_portraits,
    fig_representation,
    fig_verdicts,
)
from experiments.figures.quality import fig_accuracy_vs_loops, fig_gain_cost
from experiments.figures.style import plt
from experiments.results import atomic_write_bytes, load_run, validate_frame

log = logging.getLogger(__name__)
DPI = 130  # readable at the saved size; the figures' layout is fixed in inches

FIGURES: dict[str, tuple[str, Callable[..., Figure]]] = {
    "convergence_traces": ("traces", fig_convergence_traces),
    "oscillation": ("results", fig_oscillation),
    "heatmaps": ("traces", fig_heatmaps),
    "phase_portraits": ("traces", fig_phase_portraits),
    "verdicts": ("samples", fig_verdicts),
    "depth_histograms": ("samples", fig_depth_histograms),
    "representation": ("results", fig_representation),
    "gain_cost": ("results", fig_gain_cost),
    "accuracy_vs_loops": ("results", fig_accuracy_vs_loops),
}
# seconds to draw and save each figure on the default study's tables (one core, idle machine)
DRAW_COST = {"depth_histograms": 3.8, "heatmaps": 1.9, "convergence_traces": 1.6,
             "phase_portraits": 1.6, "accuracy_vs_loops": 1.6, "verdicts": 1.5,
             "representation": 1.3, "oscillation": 1.0, "gain_cost": 0.3}

Rendered = tuple[bytes | None, str]  # PNG bytes, or None and the reason the figure was skipped


def draw_all(run_dir: str | os.PathLike, skipped: dict[str, str] | None = None,
             workers: int = 1) -> list[Path]:
    """Draw every figure the run has data for into ``run_dir/figures/<name>.png`` (atomically).

    The tables are checked first (``check_tables``: schema columns, at least one row, some finite
    value) and every figure is drawn in memory before any file is written, so a table that is
    not a loopscope run, or a figure that fails, leaves the existing figures untouched.
    Figures whose table or metrics are absent are skipped, not drawn empty; their names and the
    reason are logged and, when ``skipped`` is a dict, recorded there.

    Args:
        run_dir: the run directory (``results.parquet`` and optionally traces / samples).
        skipped: filled with figure name -> reason for the figures not drawn.
        workers: processes drawing at once (the main one included); 1 draws sequentially.

    Returns:
        Paths of the PNG files written.

    Raises:
        ValueError: a table is foreign, empty or all-NaN, or a figure cannot be drawn.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    tables = load_run(run_dir)
    check_tables(tables)
    names = sorted(FIGURES, key=lambda n: -DRAW_COST.get(n, 1.0))
    helpers = min(workers, len(names)) - 1
    rendered = (_render_parallel(tables, names, helpers) if helpers
                else {name: render_figure(name, tables) for name in names})
    paths = []
    for name in FIGURES:  # files and skip reasons in the registry's order
        png, reason = rendered[name]
        if png is None:
            log.info("figure %s skipped: %s", name, reason)
            if skipped is not None:
                skipped[name] = reason
            continue
        paths.append(atomic_write_bytes(Path(run_dir) / "figures" / f"{name}.png", png))
    return paths


def render_figure(name: str, tables: dict[str, pd.DataFrame]) -> Rendered:
    """Figure ``name`` of ``tables`` as PNG bytes, or ``(None, reason)`` when the run has no
    data for it.

    Raises:
        ValueError: the table holds malformed values for this figure.
    """
    table, draw = FIGURES[name]
    frame = tables.get(table)
    if frame is None or frame.empty:
        return None, f"{table}.parquet absent or empty"
    kwargs: dict[str, Any] = {}
    if name == "convergence_traces":
        kwargs["tol"] = _tolerance(tables["results"])
    if name == "oscillation":
        kwargs["samples"] = tables.get("samples")
    try:
        fig = draw(frame, **kwargs)
    except ValueError as err:  # the figure's data is not in this run
        return None, str(err)
    except (KeyError, TypeError, IndexError) as err:  # malformed values in a schema'd table
        raise ValueError(f"figure {name} cannot be drawn from this run: "
                         f"{type(err).__name__}: {err}") from None
    try:
        buffer = io.BytesIO()
        # constrained layout already fits the canvas: no tight bbox (it draws a second time)
        tight = None if fig.get_layout_engine() is not None else "tight"
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches=tight)
        return buffer.getvalue(), ""
    finally:
        plt.close(fig)


def _next(counter: Any, count: int) -> int | None:
    """The next figure index to draw, shared by every process, or None when all are taken."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    return index if index < count else None


def _helper(tables: dict[str, pd.DataFrame], names: list[str], counter: Any,
            results: Any) -> None:
    """Helper process: draw figures until none is left; report each, or the first failure."""
    while (index := _next(counter, len(names))) is not None:
        try:
            results.put((names[index], render_figure(names[index], tables), None))
        except Exception as err:  # noqa: BLE001 — reported to the main process, which raises
            kind = "value" if isinstance(err, ValueError) else type(err).__name__
            results.put((names[index], (None, ""), (kind, str(err))))
            return


def _render_parallel(tables: dict[str, pd.DataFrame], names: list[str], helpers: int
                     ) -> dict[str, Rendered]:
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    counter, results = context.Value("i", 0), context.Queue()
    processes = [context.Process(target=_helper, args=(tables, names, counter, results),
                                 daemon=True) for _ in range(helpers)]
    for process in processes:
        process.start()
    try:
        rendered: dict[str, Rendered] = {}
        while (index := _next(counter, len(names))) is not None:
            rendered[names[index]] = render_figure(names[index], tables)
        while len(rendered) < len(names):
            name, value, error = _receive(results, processes)
            if error is not None:
                kind, message = error
                raise (ValueError(message) if kind == "value"
                       else RuntimeError(f"figure {name} failed in a helper: {kind}: {message}"))
            rendered[name] = value
        return rendered
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()


def _receive(results: Any, processes: list[Any]) -> tuple[str, Rendered, Any]:
    """The next helper report; RuntimeError when every helper has exited without one."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in processes):
                try:
                    return results.get(timeout=1.0)
                except queue.Empty:
                    codes = [p.exitcode for p in processes]
                    raise RuntimeError(f"a figure helper process exited (codes {codes}) "
                                       "before reporting its figures") from None


def _tolerance(results: pd.DataFrame) -> float | None:
    tol = fs.metric(results, "tolerance") if "metric" in results.columns else results.iloc[0:0]
    return float(tol["value"].iloc[0]) if not tol.empty else None


def check_tables(tables: dict[str, pd.DataFrame]) -> None:
    """``ValueError`` unless every present table has its schema's columns, some table has rows,
    and a ``results`` table with rows has some finite value."""
    from experiments.results.schema import RESULTS_COLUMNS, SAMPLES_COLUMNS, TRACES_COLUMNS

    for name, columns in (("results", RESULTS_COLUMNS), ("traces", TRACES_COLUMNS),
                          ("samples", SAMPLES_COLUMNS)):
        if name in tables:
            try:
                validate_frame(tables[name], columns)
            except ValueError as err:
                raise ValueError(f"{name}.parquet is not a loopscope table: {err}") from None
    if all(frame.empty for frame in tables.values()):
        raise ValueError(f"the tables ({', '.join(f'{n}.parquet' for n in tables)}) have no "
                         "rows; nothing to draw")
    results = tables["results"]
    values = pd.to_numeric(results["value"], errors="coerce").to_numpy(dtype=float)
    if not results.empty and not np.isfinite(values).any():
        raise ValueError("results.parquet has no finite value (all NaN or infinite); "
                         "nothing to draw")
