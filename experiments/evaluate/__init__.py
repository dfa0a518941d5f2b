"""Evaluation: per-loop measurements of trained models (``evaluator``) and the diagnostics they use
(``diagnostics``)."""

from experiments.evaluate.evaluator import Tables, distinct, evaluate_model, sweep_length

__all__ = ["Tables", "distinct", "evaluate_model", "sweep_length"]
