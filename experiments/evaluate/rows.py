"""Table rows from measurements (``measure``): what ``results`` / ``traces`` / ``samples`` hold.

Nothing here runs the model; every function is a reduction of measured tensors, so a test can
recompute any reported number from ``run_loop`` by hand (``tests/experiments/test_evaluate.py``).
Columns follow ``experiments.results.schema``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from experiments.evaluate.measure import RESIDUAL_TRACE_SAMPLES, ControllerRun, Trajectory


def quality_values(correct: Tensor, loss: Tensor, quality: str) -> dict[str, float]:
    """Mean loss over finite samples, plus accuracy (or bits/byte = loss / ln 2)."""
    finite = loss[torch.isfinite(loss)]  # diverged samples show in share_diverging instead
    values = {"loss": float(finite.mean()) if finite.numel() else math.nan}
    if quality == "bits_per_byte":
        values["bits_per_byte"] = values["loss"] / math.log(2)
    else:
        values["accuracy"] = float(correct.float().mean())
    return values


def cost_values(out: Any, tokens: Tensor, budget: int) -> dict[str, float]:
    """Mean loops, FLOPs per token, share of row-steps executed, share halted at the cap."""
    units = tokens.numel() if out.depth.dim() == 2 else tokens.shape[0]
    return {"mean_loops": float(out.depth.float().mean()),
            "flops_per_token": float(out.flops) / tokens.numel(),
            "executed_fraction": float(out.executed) / (units * budget),
            "halted_at_cap": float(out.halted_at_cap)}


def oracle_values(depth: Tensor, traj: Trajectory, budget: int) -> dict[str, float]:
    """Share of samples correct at some loop <= budget, and the mean exit minus that loop."""
    correct = traj.correct[: min(budget, traj.correct.shape[0])]  # (b, B)
    has_oracle = correct.any(dim=0)
    oracle = correct.float().argmax(dim=0) + 1  # first correct loop (1-based)
    values = {"oracle_accuracy": float(has_oracle.float().mean())}
    if has_oracle.any():
        regret = (depth.float() - oracle.float())[has_oracle]
        values["oracle_regret"] = float(regret.mean())
    return values


def long_rows(values: Tensor, metric: str, token: bool) -> pd.DataFrame:
    """(K, n) or (K, n, T) per-loop values -> long rows (sample, token, loop, metric, value)."""
    array = values.detach().float().cpu().numpy()
    if not token:
        array = array[..., None]  # (K, n, 1) with token = -1
    loops, samples, tokens = np.indices(array.shape)
    frame = pd.DataFrame({"sample": samples.ravel(), "token": tokens.ravel() if token else -1,
                          "loop": loops.ravel() + 1, "metric": metric, "value": array.ravel()})
    return frame[np.isfinite(frame["value"])]


class RowWriter:
    """Appends one model's rows on one split to ``tables`` (an ``evaluator.Tables``)."""

    def __init__(self, tables: Any, meta: dict[str, Any], batch: Any, quality: str) -> None:
        self.tables, self.meta, self.batch, self.quality = tables, meta, batch, quality

    def results(self, rows: list[tuple[str, int, int, str, float]]) -> None:
        frame = pd.DataFrame(rows, columns=["controller", "budget", "loop", "metric", "value"])
        self.tables.results.append(frame.assign(**self.meta))

    def traces(self, controller: str, budget: int, frame: pd.DataFrame) -> None:
        meta = {k: self.meta[k] for k in ("run", "arch", "split")}
        self.tables.traces.append(frame.assign(controller=controller, budget=budget, **meta))

    def shares(self, controller: str, budget: int, verdicts: Any, prefix: str = "share_") -> None:
        counts, total = verdicts.counts(), max(len(verdicts), 1)
        self.results([(controller, budget, budget, f"{prefix}{label}", n / total)
                      for label, n in counts.items()])

    def samples(self, controller: str, budget: int, depth: Tensor, correct: Tensor,
                loss: Tensor, verdicts: Any, radius: Tensor,
                expected_depth: Tensor | None = None) -> None:
        meta = {k: self.meta[k] for k in ("run", "arch", "objective", "train_loops", "split")}
        frame = pd.DataFrame({
            "sample": np.arange(depth.shape[0]),
            "difficulty": self.batch.difficulty.cpu().numpy(),
            "depth": depth.numpy().astype(np.int64),
            "expected_depth": (np.full(depth.shape[0], np.nan) if expected_depth is None
                               else expected_depth.numpy().astype(np.float64)),
            "correct": correct.numpy().astype(bool),
            "loss": loss.float().numpy(),
            "label": np.asarray(verdicts.label, dtype=object),
            "period": verdicts.period.cpu().numpy().astype(np.int64),
            "rate": verdicts.rate.float().cpu().numpy(),
            "spectral_radius": radius.numpy(),
        })
        self.tables.samples.append(frame.assign(controller=controller, budget=budget, **meta))

    # -- the fixed sweep ------------------------------------------------------------------------
    def sweep(self, traj: Trajectory, sweep: int, flops_step: float, readout: float) -> None:
        """``fixed(k)`` for k = 1..sweep: quality, loops and FLOPs per token."""
        rows = []
        for k in range(1, sweep + 1):
            values = quality_values(traj.correct[k - 1], traj.loss[k - 1], self.quality)
            values.update(mean_loops=float(k), flops_per_token=k * flops_step + readout)
            rows += [("fixed", k, k, metric, value) for metric, value in values.items()]
        self.results(rows)

    def fixed_budget(self, traj: Trajectory, budget: int, labels: Any, radius: Tensor) -> None:
        """Per-sample rows and verdict shares of ``fixed(budget)``."""
        depth = torch.full((traj.states.shape[1],), budget)
        self.samples("fixed", budget, depth, traj.correct[budget - 1], traj.loss[budget - 1],
                     labels, radius)
        self.shares("fixed", budget, labels)

    def spectral_median(self, loops: int, radius: Tensor) -> None:
        finite = radius[torch.isfinite(radius)]
        if finite.numel():
            self.results([("fixed", loops, loops, "spectral_radius", float(finite.median()))])

    def diagnostics(self, loops: int, table: pd.DataFrame) -> None:
        self.results([("fixed", loops, int(r.loop), r.metric, float(r.value))
                      for r in table.itertuples()])

    def trajectory_traces(self, traj: Trajectory, trace_samples: int) -> None:
        """Residual per sample; distance to the final state and the PCA portrait per token."""
        from experiments.evaluate.diagnostics import (
            distance_to_final,
            pca_portrait,
            relative_residual,
        )

        loops, states = traj.states.shape[0] - 1, traj.states.cpu()
        n_res = min(states.shape[1], RESIDUAL_TRACE_SAMPLES)
        residual = relative_residual(states[:, :n_res], per_sample=True).T  # (K, n)
        self.traces("fixed", loops, long_rows(residual, "residual", token=False))
        n_tok = min(states.shape[1], trace_samples)
        if n_tok == 0:
            return
        dist = distance_to_final(states[:, :n_tok], relative=True).permute(2, 0, 1)  # (K, n, T)
        self.traces("fixed", loops, long_rows(dist, "dist_to_final", token=True))
        portrait = pca_portrait(states[:, :n_tok])  # (K+1, n, T, 2)
        for index, metric in enumerate(("pc1", "pc2")):
            self.traces("fixed", loops, long_rows(portrait[1:, ..., index], metric, token=True))

    # -- controllers ----------------------------------------------------------------------------
    def controller(self, run: ControllerRun, traj: Trajectory, verdicts: dict[str, Any],
                   radius: Tensor, trace_samples: int) -> None:
        """Quality, cost and oracle rows, per-sample rows and traces of one controller run."""
        values = quality_values(run.correct, run.loss, self.quality)
        values.update(cost_values(run.out, self.batch.tokens, run.budget))
        values.update(oracle_values(run.depth, traj, run.budget))
        self.results([(run.name, run.budget, run.budget, m, v) for m, v in values.items()])
        self.samples(run.name, run.budget, run.depth, run.correct, run.loss, verdicts["sample"],
                     radius, run.expected_depth)
        self.controller_traces(run, trace_samples)

    def controller_traces(self, run: ControllerRun, trace_samples: int) -> None:
        out = run.out
        n = min(out.depth.shape[0], RESIDUAL_TRACE_SAMPLES)
        for key, metric in (("residual", "residual"), ("halt_prob", "halt_prob")):
            trace = out.trace.get(key)
            if trace is None or trace.dim() != 2:
                continue
            self.traces(run.name, run.budget, long_rows(trace[:, :n].float().cpu(), metric,
                                                        token=False))
        n_tok = min(out.depth.shape[0], trace_samples)
        if out.depth.dim() == 2 and n_tok:
            depth = out.depth[:n_tok].cpu()  # (n, T) loops used per token
            sample, token = np.indices(depth.shape)
            frame = pd.DataFrame({"sample": sample.ravel(), "token": token.ravel(),
                                  "loop": depth.numpy().ravel(), "metric": "halt_depth",
                                  "value": depth.numpy().ravel().astype(float)})
            self.traces(run.name, run.budget, frame)
