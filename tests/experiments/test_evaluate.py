"""Evaluation reports the numbers run_loop gives: recomputed by hand on a tiny untrained model."""

from __future__ import annotations

import pytest
import torch

from experiments.config.sections import EvalConfig, defaults
from experiments.evaluate import distinct, evaluate_model
from experiments.tasks import build_task
from experiments.train import TrainPlan, TrainResult
from halting import build_controller, run_loop
from models import build_model

CONVERGENCE = {"name": "convergence", "criterion": "residual", "threshold": 0.05}


class _OneBatch:
    """The parity task, except that every split is one batch fixed up front."""

    def __init__(self, task, batch):
        self.task, self.fixed = task, batch

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batch(self, split, batch_size, generator):
        return self.fixed


@pytest.fixture(scope="module")
def evaluated():
    torch.manual_seed(0)
    task = build_task("parity", max_len=6)
    batch = distinct(task.batch("val", 48, torch.Generator().manual_seed(3)))
    model = build_model("parallel_loop", vocab_size=task.vocab_size, max_seq_len=task.seq_len,
                        d_model=16, n_heads=2, n_layers=1, window=4,
                        halt_token_id=task.halt_token_id).eval()
    plan = TrainPlan("toy-fixed-L2", "parallel_loop", {}, "fixed", {"name": "fixed"}, 2)
    trained = TrainResult(plan, model, build_controller({"name": "fixed", "loops": 2}))
    cfg = {**defaults(EvalConfig), "splits": ["val"], "batch_size": 48, "unroll": 4,
           "verdict_loops": 8, "budgets": [3], "controllers": {"conv": CONVERGENCE},
           "spectral_samples": 2, "spectral_iters": 4, "attention_samples": 2, "trace_samples": 2}
    tables = evaluate_model(trained, _OneBatch(task, batch), cfg, 0, torch.device("cpu"))
    return model, task, batch, tables.frames()


def _value(results, controller, budget, metric, loop=None):
    part = results[(results["controller"] == controller) & (results["budget"] == budget)
                   & (results["metric"] == metric)]
    if loop is not None:
        part = part[part["loop"] == loop]
    assert len(part) == 1, (controller, budget, metric, len(part))
    return float(part["value"].iloc[0])


@torch.no_grad()
def test_fixed_sweep_equals_run_loop_at_every_loop_count(evaluated):
    model, task, batch, frames = evaluated
    results = frames["results"]
    for k in range(1, 9):  # sweep = max(unroll 4, 4 x 2 training loops) = 8
        out = run_loop(model, batch.tokens, "fixed", max_loops=k)
        scores = task.score(out.logits.float(), batch)
        assert _value(results, "fixed", k, "accuracy") == pytest.approx(
            float(scores["correct"].float().mean()), abs=1e-6)
        assert _value(results, "fixed", k, "loss") == pytest.approx(
            float(scores["loss"].mean()), rel=1e-5)
        assert _value(results, "fixed", k, "mean_loops") == k
        assert _value(results, "fixed", 8, "accuracy_at_loop", loop=k) == pytest.approx(
            float(scores["correct"].float().mean()), abs=1e-6)


@torch.no_grad()
def test_controller_rows_equal_run_loop_under_that_controller(evaluated):
    model, task, batch, frames = evaluated
    results, samples = frames["results"], frames["samples"]
    out = run_loop(model, batch.tokens, build_controller(dict(CONVERGENCE)), max_loops=3,
                   record=True)
    scores = task.score(out.logits.float(), batch)
    assert _value(results, "conv", 3, "accuracy") == pytest.approx(
        float(scores["correct"].float().mean()), abs=1e-6)
    assert _value(results, "conv", 3, "mean_loops") == pytest.approx(
        float(out.depth.float().mean()))
    assert _value(results, "conv", 3, "halted_at_cap") == pytest.approx(out.halted_at_cap)
    assert _value(results, "conv", 3, "executed_fraction") == pytest.approx(
        out.executed / (batch.tokens.shape[0] * 3))
    rows = samples[(samples["controller"] == "conv") & (samples["budget"] == 3)]
    assert rows.sort_values("sample")["depth"].tolist() == out.depth.tolist()
    assert rows.sort_values("sample")["correct"].tolist() == scores["correct"].tolist()


@torch.no_grad()
def test_oracle_rows_follow_the_fixed_sweep(evaluated):
    model, task, batch, frames = evaluated
    correct = torch.stack([task.score(run_loop(model, batch.tokens, "fixed", max_loops=k)
                                      .logits.float(), batch)["correct"] for k in (1, 2, 3)])
    out = run_loop(model, batch.tokens, build_controller(dict(CONVERGENCE)), max_loops=3)
    has = correct.any(dim=0)
    assert _value(frames["results"], "conv", 3, "oracle_accuracy") == pytest.approx(
        float(has.float().mean()))
    if has.any():
        first = correct.float().argmax(dim=0) + 1
        regret = float((out.depth.float() - first.float())[has].mean())
        assert _value(frames["results"], "conv", 3, "oracle_regret") == pytest.approx(regret)
    else:  # no sample is ever right within the budget: no regret row is written
        assert not (frames["results"]["metric"] == "oracle_regret").any()


def test_tolerance_row_reads_the_criterion_default_when_threshold_is_null():
    """``threshold: null`` (the default study's residual controller) still records the tolerance
    the traces figure draws; it was silently dropped (10 rows fewer than the old main)."""
    from experiments.evaluate.evaluator import _SplitEvaluator
    from halting import build_controller

    class Rows:
        def __init__(self):
            self.rows = []

        def results(self, rows):
            self.rows += rows

    evaluator = object.__new__(_SplitEvaluator)
    evaluator.rows = Rows()
    evaluator.cfg = {"controllers": {"convergence_residual": {
        "name": "convergence", "criterion": "residual", "threshold": None}}}
    evaluator.tolerance_row()
    default = build_controller("convergence", criterion="residual").threshold
    assert evaluator.rows.rows == [("convergence_residual", 0, 0, "tolerance", default)]
    evaluator.rows = Rows()
    evaluator.cfg["controllers"]["convergence_residual"]["threshold"] = 0.01
    evaluator.tolerance_row()
    assert evaluator.rows.rows[0][-1] == 0.01
