"""Evaluating trained looped models: the fixed sweep, every controller, verdicts, diagnostics.

For each trained model and each evaluation split (``val``, ``hard``; one seeded batch per split,
the same for every model):

1. **Unrolled trajectory.** ``run_loop(model, tokens, "fixed", max_loops=K, record=True)`` with
   ``K = max(verdict_loops, sweep)`` keeps every state ((K+1, B, T, D)). The fixed sweep
   ``fixed(k)`` for ``k = 1 .. sweep`` (``sweep = max(unroll, 4 x training depth)``) is read off
   this one trajectory: ``fixed(k)``'s logits are ``readout(z_k)`` (``halting`` tests that
   ``run_loop(fixed(k))`` equals ``model(x, loops=k)``), so the sweep costs one unroll.
2. **Verdicts.** ``fixedpoint.classify`` labels each sample's trajectory (and each token's, per
   token) at length K; the fixed controller's rows at budget ``b >= 7`` are classified on the
   prefix of length b+1 (verdict composition per loop budget; classify needs >= 8 states).
   The spectral radius of the step map ``z -> model.step(z, ctx, K)`` at the final state is
   estimated for the first ``spectral_samples`` samples (power iteration, ``fixedpoint``). A
   diverging trajectory is a verdict, never a crash: non-finite states are labelled by classify.
3. **Per-loop diagnostics** (``experiments.evaluate.diagnostics.per_loop_table``) on the
   trajectory, with attention captured on the first ``attention_samples`` samples, plus the logit
   lens.
4. **Controllers.** Every controller of ``eval.controllers`` and the model's own training
   controller, at every budget: ``halting.run_loop(..., record=True)``; accuracy (or bits/byte),
   loss, mean loops, FLOPs per token, executed row-steps, share halted at the cap, and the regret
   against the oracle exit (the earliest loop at which the sample is correct in the fixed sweep,
   REFERENCE.md §2): ``oracle_regret`` = mean(exit - oracle) over samples with an oracle within
   the budget (> 0 wasted loops, < 0 exits too early), ``oracle_accuracy`` = share of samples with
   one (the ceiling any exit rule could reach).

Measuring is ``experiments.evaluate.measure`` (every loop a ``halting.run_loop``), turning the
measurements into rows ``experiments.evaluate.rows``; this module runs the two in order. Tables
follow ``experiments.results.schema``; rows are accumulated here and written by the app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from experiments.evaluate import measure
from experiments.evaluate.measure import Trajectory
from experiments.evaluate.rows import RowWriter
from experiments.results.schema import RESULTS_COLUMNS, SAMPLES_COLUMNS, TRACES_COLUMNS
from experiments.tasks import Batch

MIN_CLASSIFY_STATES = 8


@dataclass
class Tables:
    """Rows of the three tables, accumulated as lists of frames."""

    results: list[pd.DataFrame] = field(default_factory=list)
    traces: list[pd.DataFrame] = field(default_factory=list)
    samples: list[pd.DataFrame] = field(default_factory=list)

    def extend(self, other: Tables) -> None:
        self.results += other.results
        self.traces += other.traces
        self.samples += other.samples

    def frames(self) -> dict[str, pd.DataFrame]:
        """Concatenated tables with the schema's columns in order."""
        out = {}
        for name, columns in (("results", RESULTS_COLUMNS), ("traces", TRACES_COLUMNS),
                              ("samples", SAMPLES_COLUMNS)):
            parts = [p for p in getattr(self, name) if not p.empty]
            frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
            out[name] = frame[columns]
        return out


def evaluate_model(trained: Any, task: Any, eval_cfg: dict[str, Any], seed: int,
                   device: torch.device, granularity: str = "sample") -> Tables:
    """Evaluate one trained model on every split; see the module docstring.

    Args:
        trained: an ``experiments.train.TrainResult``.
        task: the ``experiments.tasks.Task`` it was trained on.
        eval_cfg: the validated ``eval`` config section.
        seed: seeds the evaluation batches (identical for every model of a run).
        device: where to evaluate.
        granularity: ``sample`` or ``token`` for the controllers.
    """
    tables = Tables()
    trained.model.eval()
    trained.controller.eval()
    for split in eval_cfg["splits"]:
        torch.manual_seed(seed)  # recurrent_depth draws its initial state from torch's RNG
        generator = torch.Generator().manual_seed(seed * 7_919 + 101 + _split_index(split))
        batch = distinct(task.batch(split, eval_cfg["batch_size"], generator)).to(device)
        evaluator = _SplitEvaluator(trained, task, eval_cfg, batch, split, granularity)
        tables.extend(evaluator.run())
    return tables


def distinct(batch: Batch) -> Batch:
    """The batch without repeated examples (first occurrences, in order).

    Small task spaces repeat examples within a batch (S3 lengths 2..6: 1024 draws hold ~520
    distinct sequences); scoring each once makes every accuracy a share of distinct examples, so
    the report's standard error sqrt(p(1-p)/n) uses the n that is really there.
    """
    rows = torch.cat((batch.tokens, batch.targets), dim=1)  # (B, 2T): same input, same answer
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), rows.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(rows.shape[0]), reduce="amin")
    keep = first.sort().values
    return Batch(batch.tokens[keep], batch.targets[keep], batch.difficulty[keep])


def _split_index(split: str) -> int:
    return ("train", "val", "hard").index(split)


def sweep_length(eval_cfg: dict[str, Any], train_loops: int) -> int:
    """Loops of the fixed sweep: at least ``unroll`` and at least 4x the training depth."""
    return max(eval_cfg["unroll"], 4 * train_loops)


class _SplitEvaluator:
    """All evaluation of one model on one batch: measure (``measure``), then rows (``rows``)."""

    def __init__(self, trained: Any, task: Any, cfg: dict[str, Any], batch: Any, split: str,
                 granularity: str) -> None:
        plan = trained.plan
        self.trained, self.task, self.cfg, self.batch = trained, task, cfg, batch
        self.model, self.granularity = trained.model, granularity
        self.sweep = sweep_length(cfg, plan.loops)
        self.loops = max(cfg["verdict_loops"], self.sweep)
        meta = {"run": plan.run_id, "task": task.name, "arch": plan.arch,
                "objective": plan.objective, "train_loops": plan.loops, "split": split}
        quality = "bits_per_byte" if task.metric == "bits_per_byte" else "accuracy"
        self.tables = Tables()
        self.rows = RowWriter(self.tables, meta, batch, quality)

    def run(self) -> Tables:
        traj = measure.unroll(self.model, self.task, self.batch, self.loops)
        with torch.no_grad():
            verdicts = measure.classify_trajectory(traj)
        radius = measure.spectral(self.model, traj, self.cfg["spectral_samples"],
                                  self.cfg["spectral_iters"])
        self.fixed_rows(traj, verdicts, radius)
        finite = measure.finite_samples(traj)
        maps = measure.attention(self.model, self.batch, self.cfg["attention_samples"],
                                 min(self.loops, self.sweep), finite)
        self.rows.diagnostics(self.loops, measure.per_loop_diagnostics(traj, maps, finite))
        self.rows.trajectory_traces(traj, self.cfg["trace_samples"])
        replay = traj if measure.can_replay(self.model, self.batch, traj) else None
        unrolled = traj if measure.same_start(self.model, self.batch, traj) else None
        for name, controller, budgets in self.controllers():
            for budget in budgets:
                run = measure.run_controller(self.model, self.task, self.batch, name, controller,
                                             budget, self.granularity, replay, unrolled)
                self.rows.controller(run, traj, verdicts, radius, self.cfg["trace_samples"])
        self.tolerance_row()
        return self.tables

    def fixed_rows(self, traj: Trajectory, verdicts: dict[str, Any], radius: Tensor) -> None:
        """The sweep, then per-sample rows at every budget long enough to classify."""
        flops_step = self.model.flops_per_token_step(self.batch.tokens.shape[1])
        readout = 2.0 * self.model.d_model * self.model.vocab_size
        self.rows.sweep(traj, self.sweep, flops_step, readout)
        candidates = [*self.cfg["budgets"], self.trained.plan.loops, self.sweep, self.loops]
        budgets = sorted({b for b in candidates
                          if b + 1 >= MIN_CLASSIFY_STATES and b <= self.loops})
        for budget in budgets:
            labels = measure.prefix_verdicts(traj, budget, verdicts)
            self.rows.fixed_budget(traj, budget, labels, radius)
        self.rows.shares("fixed", self.loops, verdicts["token"], prefix="share_token_")
        self.rows.spectral_median(self.loops, radius)

    def controllers(self) -> list[tuple[str, Any, list[int]]]:
        """Every ``eval.controllers`` entry at every budget, plus the model's own learned one."""
        from halting import build_controller

        plan, found = self.trained.plan, []
        for name, cfg in self.cfg["controllers"].items():
            found.append((name, build_controller(dict(cfg)), list(self.cfg["budgets"])))
        if plan.objective != "fixed" and plan.objective not in self.cfg["controllers"]:
            budgets = sorted({*self.cfg["budgets"], plan.loops})
            found.append((plan.objective, self.trained.controller, budgets))
        for _, controller, _ in found:
            controller.eval()
        return found

    def tolerance_row(self) -> None:
        """The residual-criterion threshold, drawn as the tolerance line of the traces figure."""
        from halting import build_controller

        for name, cfg in self.cfg["controllers"].items():
            if cfg.get("criterion") == "residual":
                # ``threshold: null`` means the criterion's own default: read it off the built
                # controller, else the row (and the figure's tolerance line) silently vanishes
                threshold = cfg.get("threshold")
                if threshold is None:
                    threshold = build_controller(dict(cfg)).threshold
                self.rows.results([(name, 0, 0, "tolerance", float(threshold))])
                return
