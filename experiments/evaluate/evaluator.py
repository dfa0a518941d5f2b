"""Evaluating trained looped models: the fixed sweep, every controller, verdicts, diagnostics.

For each trained model and each evaluation split (``val``, ``hard``; one seeded batch per split,
the same for every model):

1. **Unrolled trajectory.** The model's loop runs ``K = max(verdict_loops, sweep)`` steps with
   ``z_{k+1} = model.step(z_k, ctx, k)`` and every state kept ((K+1, B, T, D)). The fixed sweep
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

Tables follow ``experiments.results.schema``; rows are accumulated here and written by the app.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from experiments.evaluate.decode_latency import decode_ms_per_token
from experiments.results.schema import RESULTS_COLUMNS, SAMPLES_COLUMNS, TRACES_COLUMNS
from experiments.tasks import Batch

RESIDUAL_TRACE_SAMPLES = 64  # samples whose per-loop residual trace is stored per run
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


@dataclass
class Trajectory:
    """The unrolled fixed sweep of one model on one batch."""

    states: Tensor          # (K+1, B, T, D)
    ctx: Any                # the LoopContext the steps ran with
    correct: Tensor         # (K, B) bool, fixed(k) correct for k = 1..K
    loss: Tensor            # (K, B)
    lens_logits: Tensor     # (K, n, T, V) readouts of the first n samples (logit lens)


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
    """All evaluation of one model on one batch (read top to bottom)."""

    def __init__(self, trained: Any, task: Any, cfg: dict[str, Any], batch: Any, split: str,
                 granularity: str) -> None:
        plan = trained.plan
        self.trained, self.task, self.cfg, self.batch = trained, task, cfg, batch
        self.model, self.granularity = trained.model, granularity
        self.sweep = sweep_length(cfg, plan.loops)
        self.loops = max(cfg["verdict_loops"], self.sweep)
        self.meta = {"run": plan.run_id, "task": task.name, "arch": plan.arch,
                     "objective": plan.objective, "train_loops": plan.loops, "split": split}
        self.quality = "bits_per_byte" if task.metric == "bits_per_byte" else "accuracy"
        self.tables = Tables()

    def run(self) -> Tables:
        with torch.no_grad():
            traj = self.unroll()
            verdicts = self.classify(traj)
        radius = self.spectral(traj)
        self.fixed_rows(traj, verdicts, radius)
        self.diagnostic_rows(traj)
        self.trajectory_traces(traj)
        for name, controller, budgets in self.controllers():
            for budget in budgets:
                self.controller_rows(name, controller, budget, traj, verdicts, radius)
        self.tolerance_row()
        return self.tables

    def tolerance_row(self) -> None:
        """The residual-criterion threshold, drawn as the tolerance line of the traces figure."""
        for name, cfg in self.cfg["controllers"].items():
            if cfg.get("criterion") == "residual" and cfg.get("threshold") is not None:
                self._add_results([(name, 0, 0, "tolerance", float(cfg["threshold"]))])
                return

    # -- 1. the unrolled trajectory and the fixed sweep -----------------------------------------
    def unroll(self) -> Trajectory:
        ctx = self.model.prepare(self.batch.tokens)
        z = self.model.init_state(ctx)
        states = [z]
        for k in range(self.loops):
            z = self.model.step(z, ctx, k)
            states.append(z)
        states = torch.stack(states).float()  # (K+1, B, T, D)
        n_lens = min(self.batch.tokens.shape[0], RESIDUAL_TRACE_SAMPLES)
        correct, loss, lens = [], [], []
        for k in range(1, self.loops + 1):
            logits = self.model.readout(states[k].to(z.dtype), ctx).float()  # (B, T, V)
            scores = self.score(logits)
            correct.append(scores["correct"].cpu())
            loss.append(scores["loss"].float().cpu())
            lens.append(logits[:n_lens].cpu())
        return Trajectory(states, ctx, torch.stack(correct), torch.stack(loss), torch.stack(lens))

    def score(self, logits: Tensor) -> dict[str, Tensor]:
        """The task's scores; a sample whose logits are not finite (diverged) is never correct
        (argmax over NaN would pick an arbitrary token)."""
        scores = dict(self.task.score(logits, self.batch))
        finite = torch.isfinite(logits).flatten(start_dim=1).all(dim=1)  # (B,)
        scores["correct"] = scores["correct"] & finite.to(scores["correct"].device)
        return scores

    def classify(self, traj: Trajectory) -> dict[str, Any]:
        from fixedpoint import classify

        states = traj.states.cpu()
        return {"sample": classify(states), "token": classify(states, per_token=True)}

    def spectral(self, traj: Trajectory) -> Tensor:
        """(B,) spectral radius at the final state; NaN outside the first ``spectral_samples``."""
        from fixedpoint import spectral_radius

        batch = traj.states.shape[1]
        radius = torch.full((batch,), float("nan"))
        n = min(self.cfg["spectral_samples"], batch)
        if n == 0:
            return radius
        # A diverged trajectory has no Jacobian to speak of: its rows are evaluated at 0 instead
        # (rows are independent, so the others' estimates are exactly those of a clean batch)
        # and reported as NaN.
        final = traj.states[-1, :n].to(self.batch_dtype)
        finite = torch.isfinite(final).flatten(start_dim=1).all(dim=1)  # (n,)
        if not finite.any():
            return radius
        final = torch.where(finite.view(-1, *[1] * (final.dim() - 1)), final, 0.0)
        sub_ctx = traj.ctx.select(torch.arange(n, device=final.device))
        step_k = self.loops  # the map applied after the last recorded step

        def step_map(z: Tensor) -> Tensor:
            return self.model.step(z, sub_ctx, step_k)

        with torch.enable_grad():
            estimate = spectral_radius(step_map, final, self.cfg["spectral_iters"],
                                       method="vjp").float().cpu()
        radius[:n] = torch.where(finite.cpu(), estimate, math.nan)
        return radius

    @property
    def batch_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- 2. rows of the fixed sweep ---------------------------------------------------------------
    def fixed_rows(self, traj: Trajectory, verdicts: dict[str, Any], radius: Tensor) -> None:
        flops_step = self.model.flops_per_token_step(self.batch.tokens.shape[1])
        readout = 2.0 * self.model.d_model * self.model.vocab_size
        rows = []
        for k in range(1, self.sweep + 1):
            values = self._quality_values(traj.correct[k - 1], traj.loss[k - 1])
            values.update(mean_loops=float(k), flops_per_token=k * flops_step + readout)
            rows += [("fixed", k, k, metric, value) for metric, value in values.items()]
        trained = self.trained.plan.loops  # latency next to the FLOPs, at the training depth
        rows.append(("fixed", trained, trained, "decode_ms_per_token",
                     decode_ms_per_token(self.model, self.batch.tokens, trained)))
        self._add_results(rows)
        candidates = [*self.cfg["budgets"], self.trained.plan.loops, self.sweep, self.loops]
        budgets = sorted({b for b in candidates
                          if b + 1 >= MIN_CLASSIFY_STATES and b <= self.loops})
        for budget in budgets:
            labels = self._prefix_verdicts(traj, budget, verdicts)
            depth = torch.full((traj.states.shape[1],), budget)
            self._add_samples("fixed", budget, depth, traj.correct[budget - 1],
                              traj.loss[budget - 1], labels, radius)
            self._add_shares("fixed", budget, labels)
        self._add_shares("fixed", self.loops, verdicts["token"], prefix="share_token_")
        finite = radius[torch.isfinite(radius)]
        if finite.numel():
            self._add_results([("fixed", self.loops, self.loops, "spectral_radius",
                                float(finite.median()))])

    def _prefix_verdicts(self, traj: Trajectory, budget: int, verdicts: dict[str, Any]) -> Any:
        from fixedpoint import classify

        if budget == self.loops:
            return verdicts["sample"]
        return classify(traj.states[: budget + 1].cpu())

    def _quality_values(self, correct: Tensor, loss: Tensor) -> dict[str, float]:
        finite = loss[torch.isfinite(loss)]  # diverged samples show in share_diverging instead
        values = {"loss": float(finite.mean()) if finite.numel() else math.nan}
        if self.quality == "bits_per_byte":
            values["bits_per_byte"] = values["loss"] / math.log(2)
        else:
            values["accuracy"] = float(correct.float().mean())
        return values

    # -- 3. per-loop diagnostics and trajectory traces -------------------------------------------
    def diagnostic_rows(self, traj: Trajectory) -> None:
        from experiments.evaluate.diagnostics import logit_lens_kl, per_loop_table

        # samples that diverged would make every batch mean NaN: they are left out here and
        # show up as the `diverging` verdict instead
        finite = torch.isfinite(traj.states).flatten(start_dim=2).all(dim=2).all(dim=0).cpu()
        attention = self._attention(finite)
        table = per_loop_table(traj.states.cpu(), attention=attention)
        logits = traj.lens_logits[:, finite[: traj.lens_logits.shape[1]]]  # (K, n', T, V)
        lens = logit_lens_kl(logits, logits[-1]) if logits.shape[1] else torch.empty(0)
        extra = [(k + 1, "logit_lens_kl", float(v)) for k, v in enumerate(lens.tolist())]
        extra += [(k + 1, "accuracy_at_loop", float(c.float().mean()))
                  for k, c in enumerate(traj.correct)]  # loops 1..K of the unrolled trajectory
        table = pd.concat([table, pd.DataFrame(extra, columns=["loop", "metric", "value"])])
        self._add_results([("fixed", self.loops, int(r.loop), r.metric, float(r.value))
                           for r in table.itertuples()])

    def _attention(self, finite: Tensor) -> list[dict[str, Any]] | None:
        n = min(self.cfg["attention_samples"], self.batch.tokens.shape[0])
        keep = finite[:n]  # (n,) samples whose trajectory stayed finite
        if n == 0 or not keep.any():
            return None
        with torch.no_grad():
            ctx = self.model.prepare(self.batch.tokens[:n], capture_attention=True)
            z = self.model.init_state(ctx)
            for k in range(min(self.loops, self.sweep)):
                z = self.model.step(z, ctx, k)
        return [dict(entry, probs=entry["probs"].float().cpu()[keep])  # (n', H, T, T)
                for entry in ctx.attention or []]

    def trajectory_traces(self, traj: Trajectory) -> None:
        from experiments.evaluate.diagnostics import (
            distance_to_final,
            pca_portrait,
            relative_residual,
        )

        states = traj.states.cpu()
        n_res = min(states.shape[1], RESIDUAL_TRACE_SAMPLES)
        residual = relative_residual(states[:, :n_res], per_sample=True).T  # (K, n)
        self._add_traces("fixed", self.loops, _long(residual, "residual", token=False))
        n_tok = min(states.shape[1], self.cfg["trace_samples"])
        if n_tok == 0:
            return
        dist = distance_to_final(states[:, :n_tok], relative=True).permute(2, 0, 1)  # (K, n, T)
        self._add_traces("fixed", self.loops, _long(dist, "dist_to_final", token=True))
        portrait = pca_portrait(states[:, :n_tok])  # (K+1, n, T, 2)
        for index, metric in enumerate(("pc1", "pc2")):
            frame = _long(portrait[1:, ..., index], metric, token=True)
            self._add_traces("fixed", self.loops, frame)

    # -- 4. controllers ---------------------------------------------------------------------------
    def controllers(self) -> list[tuple[str, Any, list[int]]]:
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

    def controller_rows(self, name: str, controller: Any, budget: int, traj: Trajectory,
                        verdicts: dict[str, Any], radius: Tensor) -> None:
        from halting import run_loop

        tokens = self.batch.tokens
        with torch.no_grad():
            out = run_loop(self.model, tokens, controller, max_loops=budget,
                           granularity=self.granularity, record=True)
        scores = self.score(out.logits.float())
        depth = out.depth if out.depth.dim() == 1 else out.depth.max(dim=1).values
        depth = depth.cpu()
        values = self._quality_values(scores["correct"].cpu(), scores["loss"].float().cpu())
        values.update(self._cost_values(out, tokens, budget))
        values.update(self._oracle_values(depth, traj, budget))
        self._add_results([(name, budget, budget, m, v) for m, v in values.items()])
        self._add_samples(name, budget, depth, scores["correct"].cpu(), scores["loss"].cpu(),
                          verdicts["sample"], radius)
        self._controller_traces(name, budget, out)

    def _cost_values(self, out: Any, tokens: Tensor, budget: int) -> dict[str, float]:
        units = tokens.numel() if out.depth.dim() == 2 else tokens.shape[0]
        return {"mean_loops": float(out.depth.float().mean()),
                "flops_per_token": float(out.flops) / tokens.numel(),
                "executed_fraction": float(out.executed) / (units * budget),
                "halted_at_cap": float(out.halted_at_cap)}

    def _oracle_values(self, depth: Tensor, traj: Trajectory, budget: int) -> dict[str, float]:
        correct = traj.correct[: min(budget, traj.correct.shape[0])]  # (b, B)
        has_oracle = correct.any(dim=0)
        oracle = correct.float().argmax(dim=0) + 1  # first correct loop (1-based)
        values = {"oracle_accuracy": float(has_oracle.float().mean())}
        if has_oracle.any():
            regret = (depth.float() - oracle.float())[has_oracle]
            values["oracle_regret"] = float(regret.mean())
        return values

    def _controller_traces(self, name: str, budget: int, out: Any) -> None:
        n = min(out.depth.shape[0], RESIDUAL_TRACE_SAMPLES)
        for key, metric in (("residual", "residual"), ("halt_prob", "halt_prob")):
            trace = out.trace.get(key)
            if trace is None or trace.dim() != 2:
                continue
            self._add_traces(name, budget, _long(trace[:, :n].float().cpu(), metric, token=False))
        n_tok = min(out.depth.shape[0], self.cfg["trace_samples"])
        if out.depth.dim() == 2 and n_tok:
            depth = out.depth[:n_tok].cpu()  # (n, T) loops used per token
            sample, token = np.indices(depth.shape)
            frame = pd.DataFrame({"sample": sample.ravel(), "token": token.ravel(),
                                  "loop": depth.numpy().ravel(), "metric": "halt_depth",
                                  "value": depth.numpy().ravel().astype(float)})
            self._add_traces(name, budget, frame)

    # -- row helpers ------------------------------------------------------------------------------
    def _add_results(self, rows: list[tuple[str, int, int, str, float]]) -> None:
        frame = pd.DataFrame(rows, columns=["controller", "budget", "loop", "metric", "value"])
        self.tables.results.append(frame.assign(**self.meta))

    def _add_traces(self, controller: str, budget: int, frame: pd.DataFrame) -> None:
        meta = {k: self.meta[k] for k in ("run", "arch", "split")}
        self.tables.traces.append(frame.assign(controller=controller, budget=budget, **meta))

    def _add_shares(self, controller: str, budget: int, verdicts: Any,
                    prefix: str = "share_") -> None:
        counts, total = verdicts.counts(), max(len(verdicts), 1)
        self._add_results([(controller, budget, budget, f"{prefix}{label}", n / total)
                           for label, n in counts.items()])

    def _add_samples(self, controller: str, budget: int, depth: Tensor, correct: Tensor,
                     loss: Tensor, verdicts: Any, radius: Tensor) -> None:
        meta = {k: self.meta[k] for k in ("run", "arch", "objective", "train_loops", "split")}
        frame = pd.DataFrame({
            "sample": np.arange(depth.shape[0]),
            "difficulty": self.batch.difficulty.cpu().numpy(),
            "depth": depth.numpy().astype(np.int64),
            "correct": correct.numpy().astype(bool),
            "loss": loss.float().numpy(),
            "label": np.asarray(verdicts.label, dtype=object),
            "period": verdicts.period.cpu().numpy().astype(np.int64),
            "rate": verdicts.rate.float().cpu().numpy(),
            "spectral_radius": radius.numpy(),
        })
        self.tables.samples.append(frame.assign(controller=controller, budget=budget, **meta))


def _long(values: Tensor, metric: str, token: bool) -> pd.DataFrame:
    """(K, n) or (K, n, T) per-loop values -> long rows (sample, token, loop, metric, value)."""
    array = values.detach().float().cpu().numpy()
    if not token:
        array = array[..., None]  # (K, n, 1) with token = -1
    loops, samples, tokens = np.indices(array.shape)
    frame = pd.DataFrame({"sample": samples.ravel(), "token": tokens.ravel() if token else -1,
                          "loop": loops.ravel() + 1, "metric": metric, "value": array.ravel()})
    return frame[np.isfinite(frame["value"])]
