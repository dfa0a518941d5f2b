"""Evaluation: per-loop measurements of trained models. ``measure`` runs them (every loop a
``halting.run_loop``), ``rows`` turns them into table rows, ``evaluator`` runs both per split;
``diagnostics`` holds the built-in per-loop diagnostics and ``registry.DIAGNOSTICS`` any others.
"""

from experiments.evaluate.evaluator import Tables, distinct, evaluate_model, sweep_length
from experiments.evaluate.registry import DIAGNOSTICS

__all__ = ["DIAGNOSTICS", "Tables", "distinct", "evaluate_model", "sweep_length"]
