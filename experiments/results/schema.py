"""Column schemas of the tables a run writes; producers (evaluate) and consumers (figures, report,
collect) both import these so they cannot drift apart.

``results.parquet`` — long format, one row per run x controller x budget x split x loop x metric.
  ``loop`` is the 1-based loop index for per-loop metrics; for aggregate metrics of a controller
  at a budget (accuracy, mean_loops, flops_per_token, verdict shares, ...) it equals ``budget``.
  CKA between loops i and j is stored as metric ``cka@<j>`` at ``loop = i``.
``traces.parquet`` — long format per-step traces: one row per run x controller x budget x split x
  sample x token x loop x metric (``token = -1`` for sample-level values), e.g. ``residual``,
  ``halt_prob``, ``dist_to_final``, ``pc1``/``pc2`` (PCA phase portrait coordinates).
``samples.parquet`` — one row per evaluated sample per controller x budget: its difficulty, loops
  used (``depth``), the expected depth sum_n n p_n of a geometric halting rule
  (``expected_depth``; NaN for other controllers), correctness, loss, trajectory verdict
  (``label``, ``period``, ``rate``, ``spectral_radius``).
"""

RESULTS_COLUMNS = [
    "run", "task", "arch", "objective", "train_loops", "controller", "budget", "split",
    "loop", "metric", "value",
]
TRACES_COLUMNS = [
    "run", "arch", "controller", "budget", "split", "sample", "token", "loop", "metric", "value",
]
SAMPLES_COLUMNS = [
    "run", "arch", "objective", "train_loops", "controller", "budget", "split", "sample",
    "difficulty", "depth", "expected_depth", "correct", "loss", "label", "period", "rate",
    "spectral_radius",
]
