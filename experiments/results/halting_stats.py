"""Does learned halting spend more loops on harder inputs? Statistics and a report section.

Everything here reads the saved tables — ``samples`` (one row per evaluated distinct input,
controller and budget: ``depth``, ``difficulty``, ``correct``) and, for the fixed-loop models'
accuracy, ``results`` — so ``loopscope-plot`` can rebuild it.

* ``spearman`` — rank correlation with average ranks for ties (no SciPy dependency); NaN when
  either side is constant (a controller that always exits at the same loop has no correlation).
* ``collapse_monitor`` — REFERENCE.md §2: the entropy of the exit distribution (nats; 0 = every
  input exits at one loop, ln(cap) = uniform), the share of exits at the cap and at loop 1.
* exit depth two ways for the geometric rules (PonderNet, Ouro gate, halt token): the exit the rule
  took (``depth``: for PonderNet one Bernoulli draw per step, so it carries sampling noise) and the
  expected depth sum_n n p_n of the halting distribution the objective shapes
  (``expected_depth``; NaN for ACT and other rules). Spearman is reported for both.
* ``equal_compute`` — the learned controller's accuracy at its mean depth next to the best
  fixed-loop model whose loop count is at most that mean depth rounded up (it may spend up to one
  loop more), and the best fixed model at any depth.

Learned controllers are the trained halting rules (``LEARNED``); each trained model is judged on
its own objective at its training cap (``controller == objective``, ``budget == train_loops``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

LEARNED = ("act", "pondernet", "ouro_gate", "halt_token", "q_halt")


def spearman(x: np.ndarray | pd.Series, y: np.ndarray | pd.Series) -> float:
    """Spearman's rank correlation of two equal-length sequences (average ranks for ties)."""
    x, y = pd.Series(np.asarray(x, dtype=float)), pd.Series(np.asarray(y, dtype=float))
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2 or x.nunique() < 2 or y.nunique() < 2:
        return math.nan
    return float(np.corrcoef(x.rank().to_numpy(), y.rank().to_numpy())[0, 1])


def collapse_monitor(depth: np.ndarray | pd.Series, cap: int) -> dict[str, float]:
    """Exit entropy (nats), share of exits at ``cap`` and at loop 1, and the mean depth."""
    depth = np.asarray(depth, dtype=np.int64)
    if depth.size == 0:
        raise ValueError("collapse_monitor: no exits given")
    if depth.min() < 1 or depth.max() > cap:
        raise ValueError(f"collapse_monitor: depths must lie in 1..{cap}, got "
                         f"{int(depth.min())}..{int(depth.max())}")
    share = np.bincount(depth, minlength=cap + 1)[1:] / depth.size
    nonzero = share[share > 0]
    # max(0, .): one exit loop gives -0.0, which would print as "-0.000"
    return {"exit_entropy": max(0.0, float(-(nonzero * np.log(nonzero)).sum())),
            "max_entropy": math.log(cap), "at_cap": float(share[-1]),
            "at_loop1": float(share[0]), "mean_depth": float(depth.mean())}


def fixed_accuracy(results: pd.DataFrame | None, split: str) -> pd.Series:
    """Accuracy of each fixed-objective model at its training depth, indexed by loop count.

    Read from the ``results`` table: ``samples`` keeps per-input rows of the fixed sweep only for
    budgets long enough to classify a trajectory, not at every training depth.
    """
    if results is None or results.empty:
        return pd.Series(dtype=float)
    part = results[(results["split"] == split) & (results["controller"] == "fixed")
                   & (results["objective"] == "fixed") & (results["metric"] == "accuracy")
                   & (results["budget"] == results["train_loops"])]
    return part.groupby("train_loops")["value"].mean().sort_index()


# ``results`` stores accuracies as float32, ``samples``-derived ones are float64: the same count
# of correct inputs differs by ~1e-8 between the two, far below any real difference (1 / n_inputs)
TIE = 1e-6


def equal_compute(accuracy: float, mean_depth: float, fixed: pd.Series) -> dict[str, float]:
    """Compare a learned controller with the fixed-loop models (``fixed``: loops -> accuracy).

    ``margin`` = accuracy minus the affordable fixed model's; within ``TIE`` it is 0 (a tie read
    from float32 and float64 copies of the same fraction is a tie, not "below").
    """
    out = {"fixed_loops": math.nan, "fixed_accuracy": math.nan, "best_loops": math.nan,
           "best_accuracy": math.nan, "margin": math.nan}
    if fixed.empty:
        return out
    best = fixed.idxmax()
    out.update(best_loops=int(best), best_accuracy=float(fixed[best]))
    affordable = fixed[fixed.index <= math.ceil(mean_depth - 1e-9)]
    if not affordable.empty:
        loops = affordable.idxmax()
        margin = accuracy - float(affordable[loops])
        out.update(fixed_loops=int(loops), fixed_accuracy=float(affordable[loops]),
                   margin=0.0 if abs(margin) < TIE else margin)
    return out


def learned_rows(samples: pd.DataFrame, split: str,
                 results: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per model trained with a learned objective, evaluated with it at its cap."""
    part = samples[(samples["split"] == split) & (samples["controller"] == samples["objective"])
                   & (samples["budget"] == samples["train_loops"])
                   & samples["objective"].isin(LEARNED)]
    fixed = fixed_accuracy(results, split)
    rows = []
    for (run, controller, cap), group in part.groupby(["run", "controller", "budget"]):
        accuracy = float(group["correct"].mean())
        monitor = collapse_monitor(group["depth"], int(cap))
        expected = _expected(group)
        rows.append({"run": run, "controller": controller, "cap": int(cap), "n": len(group),
                     "accuracy": accuracy,
                     "spearman": spearman(group["depth"], group["difficulty"]),
                     "expected_depth": float(expected.mean()) if expected.notna().all()
                     else math.nan,
                     "spearman_expected": spearman(expected, group["difficulty"])
                     if expected.notna().all() else math.nan,
                     **monitor, **equal_compute(accuracy, monitor["mean_depth"], fixed)})
    return pd.DataFrame(rows)


def _expected(group: pd.DataFrame) -> pd.Series:
    """The group's expected depths (all NaN when the table predates the column)."""
    if "expected_depth" not in group:
        return pd.Series(math.nan, index=group.index)
    return group["expected_depth"].astype(float)


def monitor_rows(samples: pd.DataFrame, split: str) -> pd.DataFrame:
    """The collapse monitor for every learned controller run on every model (every budget)."""
    part = samples[(samples["split"] == split) & samples["controller"].isin(LEARNED)]
    rows = [{"run": run, "controller": controller, "budget": int(budget),
             **collapse_monitor(group["depth"], int(budget))}
            for (run, controller, budget), group in part.groupby(["run", "controller", "budget"])]
    return pd.DataFrame(rows)


def depth_table(samples: pd.DataFrame, split: str) -> pd.DataFrame:
    """Mean depth (and accuracy) per difficulty of each learned model on its own objective."""
    part = samples[(samples["split"] == split) & (samples["controller"] == samples["objective"])
                   & (samples["budget"] == samples["train_loops"])
                   & samples["objective"].isin(LEARNED)]
    part = part.assign(expected_depth=_expected(part))
    return (part.groupby(["run", "difficulty"])
            .agg(depth=("depth", "mean"), expected_depth=("expected_depth", "mean"),
                 accuracy=("correct", "mean"), n=("depth", "size"))
            .reset_index())


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _table(frame: pd.DataFrame, columns: dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |"
              for _, row in frame.iterrows()]
    return "\n".join(lines)


def _trend(rho: float) -> str:
    """How a depth follows difficulty, in words (Spearman >= 0.5 counts as rising)."""
    if not math.isfinite(rho):
        return "is constant (no correlation: every input exits at the same loop)"
    return ("rises with difficulty" if rho >= 0.5 else "does not clearly rise with difficulty"
            if rho >= 0 else "falls with difficulty")


def _verdict(row: pd.Series) -> str:
    """One sentence per learned model, with its numbers."""
    rho = row["spearman"]
    trend = _trend(rho)
    expected = "" if not math.isfinite(row.get("expected_depth", math.nan)) else (
        f"; its expected depth sum_n n p_n (mean {row['expected_depth']:.2f}) "
        f"{_trend(row['spearman_expected'])} (Spearman {_fmt(row['spearman_expected'])})")
    compare = ("no fixed-loop model to compare with" if not math.isfinite(row["fixed_accuracy"])
               else f"{'at least' if row['margin'] >= 0 else 'below'} the best fixed model with "
               f"<= {row['fixed_loops']} loops ({row['fixed_accuracy']:.3f})")
    return (f"- `{row['run']}`: mean depth {row['mean_depth']:.2f} of {row['cap']} "
            f"{trend} (Spearman {_fmt(rho)} over {row['n']} distinct inputs){expected}; accuracy "
            f"{row['accuracy']:.3f}, {compare}; best fixed at any depth: "
            f"{_fmt(row['best_accuracy'])} at {row['best_loops']} loops.")


def halting_section(samples: pd.DataFrame, split: str = "val",
                    results: pd.DataFrame | None = None) -> str:
    """Markdown: learned halting vs difficulty, equal compute, extrapolation, collapse monitor."""
    parts = []
    for name, title in ((split, f"`{split}` (interpolation)"), ("hard", "`hard` (extrapolation)")):
        rows = learned_rows(samples, name, results)
        if rows.empty:
            continue
        table = depth_table(samples, name)
        wide = table.pivot(index="run", columns="difficulty", values="depth").reset_index()
        wide.columns = [str(c) for c in wide.columns]
        per_d = {"run": "model", **{c: f"d={c}" for c in wide.columns if c != "run"}}
        acc = table.pivot(index="run", columns="difficulty", values="accuracy").reset_index()
        acc.columns = [str(c) for c in acc.columns]
        expected = ""
        if table["expected_depth"].notna().any():
            exp = table.dropna(subset=["expected_depth"]).pivot(
                index="run", columns="difficulty", values="expected_depth").reset_index()
            exp.columns = [str(c) for c in exp.columns]
            expected = ("\n\nExpected depth sum_n n p_n per difficulty (geometric halting rules):"
                        "\n\n" + _table(exp, per_d))
        parts.append(f"### {title}\n\n" + "\n".join(_verdict(r) for _, r in rows.iterrows())
                     + "\n\nMean exit depth per difficulty (number of non-zero entries / length):"
                     "\n\n" + _table(wide, per_d) + expected
                     + "\n\nAccuracy per difficulty:\n\n" + _table(acc, per_d))
    monitor = monitor_rows(samples, split)
    if not monitor.empty:
        parts.append("### Collapse monitor (`" + split + "`)\n\nExit entropy in nats (0 = one "
                     "exit loop for every input; ln(budget) = uniform), share of exits at the "
                     "budget and at loop 1, for every learned controller on every model.\n\n"
                     + _table(monitor, {"run": "model", "controller": "controller",
                                        "budget": "budget", "mean_depth": "mean depth",
                                        "exit_entropy": "exit entropy",
                                        "max_entropy": "ln(budget)", "at_cap": "at budget",
                                        "at_loop1": "at loop 1"}))
    if not parts:
        return ""
    return ("## Learned halting vs difficulty\n\nEach model trained with a learned halting "
            "objective, evaluated with that rule at its training cap. Spearman = rank "
            "correlation of exit depth with difficulty; equal compute = the best fixed-loop "
            "model with at most ceil(mean depth) loops.\n\n" + "\n\n".join(parts))
