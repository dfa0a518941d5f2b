"""Figures drawn from a run's tables: dynamics (``dynamics``), quality versus compute (``quality``),
shared layout and encoding (``style``). ``draw_all`` (``drawing``) draws every entry of
``FIGURES``, in parallel processes with ``workers > 1``."""

from experiments.figures.drawing import DRAW_COST, FIGURES, check_tables, draw_all, render_figure
from experiments.figures.dynamics import (
    VERDICT_ORDER,
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

__all__ = [
    "DRAW_COST", "FIGURES", "VERDICT_ORDER", "check_tables", "draw_all", "fig_accuracy_vs_loops",
    "fig_convergence_traces",
    "fig_depth_histograms", "fig_gain_cost", "fig_heatmaps", "fig_oscillation",
    "fig_phase_portraits", "fig_representation", "fig_verdicts", "plt", "render_figure",
]
