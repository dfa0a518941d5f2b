"""``report.md``: which loop count is worth its cost on this task — from a run's saved tables.

Reads only the run directory (``results/samples.parquet``, ``run.json``, ``decode.json`` when
present, ``figures/*.png``), so
``loopscope-plot`` regenerates it without recomputing anything.

The sweet spot is the *smallest* training loop count whose quality is within the noise of the
best one: accuracy within ``max(1 point, 2 standard errors)`` of the best (standard error of a
proportion over the evaluation samples, sqrt(p(1-p)/n)), or bits/byte within 1% of the best.
Beyond it an added loop does not buy a distinguishable gain for its compute. Its evidence: the
marginal gain per added loop and per added FLOP, the verdict composition of the unrolled
trajectory, and oscillation signs (successive-update cosine near -1 with a small period-2 return
error, periodic verdicts, spectral radius >= 1 at the final state).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.results import atomic_write_text, load_run
from experiments.results.halting_stats import halting_section

VAL = "val"
DEFAULT_EVAL_COUNT = 256  # n assumed by the standard error when samples.parquet is absent


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.md`` from the saved tables and ``run.json``; return its path."""
    run_dir = Path(run_dir)
    tables = load_run(run_dir)
    info = _read_info(run_dir)
    text = build_report(tables["results"], tables.get("samples"), info, run_dir)
    return atomic_write_text(run_dir / "report.md", text)


def _read_info(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def build_report(results: pd.DataFrame, samples: pd.DataFrame | None, info: dict[str, Any],
                 run_dir: Path) -> str:
    """The report's markdown text."""
    quality = "bits_per_byte" if (results["metric"] == "bits_per_byte").any() else "accuracy"
    split = VAL if (results["split"] == VAL).any() else str(results["split"].iloc[0])
    parts = [_header(info, quality)]
    if samples is None:  # named, so a reader knows why the numbers below assume n
        parts.append(f"> **samples.parquet is missing** from this run directory: the sweet "
                     f"spot's standard error assumes n = {DEFAULT_EVAL_COUNT} evaluation "
                     "samples and the per-sample depth section is left out.")
    sweep = _loop_table(results, quality, split)
    parts.append(_sweep_section(sweep, quality, split))
    parts.append(_sweet_spot_section(sweep, results, samples, quality, split,
                                     _nilpotent_archs(info)))
    parts.append(_unrolled_section(results, quality, split))
    parts.append(_controller_section(results, quality, split))
    if samples is not None and not samples.empty:
        parts.append(_depth_section(samples, split))
        parts.append(halting_section(samples, split, results))
    parts.append(_decode_section(sweep, run_dir))
    parts.append(_training_section(info))
    parts.append(_figures_section(run_dir))
    return "\n\n".join(p for p in parts if p) + "\n"


def _header(info: dict[str, Any], quality: str) -> str:
    cfg = info.get("config", {})
    task = cfg.get("task", {})
    lines = ["# loopscope report: which loop count is worth its cost?", ""]
    if cfg:
        train = cfg.get("train", {})
        params = ", ".join(f"{k}={v}" for k, v in task.items() if k != "name")
        lines.append(f"Study `{cfg.get('study', {}).get('name', '?')}` on task "
                     f"`{task.get('name', '?')}` ({params}); seed "
                     f"{info.get('seed', cfg.get('seed'))}; {train.get('steps')} training steps "
                     f"of batch {train.get('batch_size')} per model; quality = {quality}.")
    if "wall_seconds" in info:
        lines.append(f"Wall time {info['wall_seconds']:.1f} s on {info.get('threads', '?')} "
                     f"thread(s), device {info.get('device', '?')}.")
    lines += [f"\n> {note}" for note in info.get("notes", [])]  # e.g. a model not trained
    return "\n".join(lines)


def _better(quality: str) -> float:
    return -1.0 if quality == "bits_per_byte" else 1.0


def _pick(results: pd.DataFrame, **where: Any) -> pd.DataFrame:
    mask = pd.Series(True, index=results.index)
    for key, value in where.items():
        mask &= results[key] == value
    return results[mask]


def _loop_table(results: pd.DataFrame, quality: str, split: str) -> pd.DataFrame:
    """One row per fixed-objective model at its training depth: quality, FLOPs and gains."""
    fixed = _pick(results, controller="fixed", objective="fixed", split=split)
    at_depth = fixed[fixed["budget"] == fixed["train_loops"]]
    wide = at_depth.pivot_table(index=["arch", "train_loops"], columns="metric", values="value",
                                aggfunc="mean").reset_index()
    if wide.empty or quality not in wide:
        return pd.DataFrame()
    hard = _pick(results, controller="fixed", objective="fixed", split="hard", metric=quality)
    hard = hard[hard["budget"] == hard["train_loops"]].set_index(["arch", "train_loops"])["value"]
    wide["hard"] = [hard.get((a, t), math.nan) for a, t in zip(wide["arch"], wide["train_loops"])]
    wide = wide.sort_values(["arch", "train_loops"]).reset_index(drop=True)
    sign = _better(quality)
    wide["gain"] = wide.groupby("arch")[quality].diff() * sign
    wide["added_flops"] = wide.groupby("arch")["flops_per_token"].diff()
    wide["gain_per_gflop"] = wide["gain"] / (wide["added_flops"] / 1e9)
    return wide


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _markdown(frame: pd.DataFrame, columns: dict[str, str]) -> str:
    head = "| " + " | ".join(columns.values()) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |"
            for _, row in frame.iterrows()]
    return "\n".join([head, rule, *body])


def _sweep_section(sweep: pd.DataFrame, quality: str, split: str) -> str:
    if sweep.empty:
        return "## Quality vs loops\n\nNo model was trained with a fixed loop count in this run."
    columns = {"arch": "arch", "train_loops": "loops", quality: f"{quality} ({split})",
               "hard": f"{quality} (hard)", "loss": "loss", "flops_per_token": "FLOPs/token",
               "gain": "gain vs one loop fewer", "gain_per_gflop": "gain per added GFLOP/token"}
    return (f"## Quality vs loops\n\nEach model evaluated at its training depth on the `{split}` "
            f"split (`hard`: longer inputs). Gain is the change in {quality} from the model "
            "trained with one loop fewer (positive = better); its cost is the added FLOPs per "
            "token.\n\n" + _markdown(sweep, columns))


def _sweet_spot(sweep: pd.DataFrame, quality: str, n_eval: int) -> tuple[int, str]:
    best = sweep[quality].max() if quality == "accuracy" else sweep[quality].min()
    if quality == "accuracy":
        se = math.sqrt(max(best * (1 - best), 1e-12) / max(n_eval, 1))
        margin = max(0.01, 2 * se)
        ok = sweep[sweep[quality] >= best - margin]
        rule = f"accuracy within {margin:.3f} (max(1 point, 2 s.e.)) of the best {best:.3f}"
    else:
        margin = 0.01 * best
        ok = sweep[sweep[quality] <= best + margin]
        rule = f"bits/byte within 1% of the best {best:.3f}"
    return int(ok["train_loops"].min()), rule


def _nilpotent_archs(info: dict[str, Any]) -> set[str]:
    """Architectures whose models declared ``nilpotent_step`` (``run.json``'s ``models``)."""
    return {m.get("arch") for m in info.get("models") or [] if m.get("nilpotent_step")}


def _sweet_spot_section(sweep: pd.DataFrame, results: pd.DataFrame,
                        samples: pd.DataFrame | None, quality: str, split: str,
                        nilpotent: set[str] = frozenset()) -> str:
    if sweep.empty:
        return ""
    lines = ["## Sweet spot"]
    for arch, part in sweep.groupby("arch"):
        n_eval = _eval_count(samples, split)
        loops, rule = _sweet_spot(part.reset_index(drop=True), quality, n_eval)
        lines.append(f"\n**{arch}: {loops} loop(s)** — the smallest loop count with {rule}.")
        nxt = part[part["train_loops"] > loops].head(1)
        if loops == int(part["train_loops"].max()):
            lines.append("- It is the largest loop count trained: more loops may still pay; "
                         "extend `study.train_loops` to find where the gain stops.")
        if not nxt.empty:
            row = nxt.iloc[0]
            lines.append(f"- Going to {int(row['train_loops'])} loops changes {quality} by "
                         f"{_fmt(row['gain'])} (sign: + better) for "
                         f"{_fmt(row['added_flops'])} more FLOPs/token "
                         f"({_fmt(row['gain_per_gflop'])} per GFLOP/token).")
        lines += _dynamics_evidence(results, arch, loops, split, arch in nilpotent)
    return "\n".join(lines)


def _eval_count(samples: pd.DataFrame | None, split: str) -> int:
    if samples is None or samples.empty:
        return DEFAULT_EVAL_COUNT
    part = samples[(samples["split"] == split)]
    if not len(part):
        return DEFAULT_EVAL_COUNT
    return int(part.groupby(["run", "controller", "budget"]).size().max())


def _dynamics_evidence(results: pd.DataFrame, arch: str, loops: int, split: str,
                       nilpotent: bool = False) -> list[str]:
    run = _pick(results, arch=arch, objective="fixed", train_loops=loops, split=split,
                controller="fixed")
    if run.empty:
        return []
    horizon = int(run["budget"].max())
    shares = run[(run["budget"] == horizon) & run["metric"].str.startswith("share_")
                 & ~run["metric"].str.startswith("share_token_")]
    composition = ", ".join(f"{m[6:]} {v:.0%}" for m, v in zip(shares["metric"], shares["value"])
                            if v > 0)
    lines = [f"- Unrolled to K = {horizon} loops, its trajectories are: {composition or '—'}."]
    tail = run[(run["loop"] > loops) & (run["budget"] == horizon)]
    cos = tail[tail["metric"] == "cos_prev"]["value"].median()
    p2 = tail[tail["metric"] == "period2_return_error"]["value"].median()
    res = tail[tail["metric"] == "relative_residual"]["value"].median()
    radius = run[run["metric"] == "spectral_radius"]["value"]
    lines.append(f"- Beyond its training depth: median successive-update cosine {_fmt(cos)}, "
                 f"period-2 return error {_fmt(p2)}, relative residual {_fmt(res)}"
                 + (f"; spectral radius at the final state {_fmt(radius.iloc[0])}"
                    if not radius.empty else "") + ".")
    if nilpotent and not radius.empty and radius.iloc[0] == 0 and res == 0:
        lines.append("- The state stops changing exactly (residual 0, spectral radius 0): the step "
                     "reads the state only through a one-position shift (the model declares "
                     "`nilpotent_step`, e.g. parallel-loop CLP), so its Jacobian is nilpotent and "
                     "every trajectory is fixed after at most sequence-length loops; extra loops "
                     "past that cost compute and change nothing.")
    oscillating = (cos < -0.5 and p2 < res) if math.isfinite(cos) and math.isfinite(p2) else False
    lines.append("- Oscillation evidence: " + (
        "yes — updates reverse direction each loop and states return after two loops."
        if oscillating else "none — updates do not alternate into a 2-cycle."))
    return lines


def _unrolled_section(results: pd.DataFrame, quality: str, split: str) -> str:
    fixed = _pick(results, controller="fixed", split=split, metric=quality)
    if fixed.empty:
        return ""
    rows = []
    for (run, train_loops), part in fixed.groupby(["run", "train_loops"]):
        by_budget = part.set_index("budget")["value"]
        top = int(by_budget.index.max())
        best_budget = by_budget.idxmax() if quality == "accuracy" else by_budget.idxmin()
        rows.append({"run": run, "trained": int(train_loops),
                     "at_depth": by_budget.get(int(train_loops), math.nan),
                     "at_4x": by_budget.get(min(4 * int(train_loops), top), math.nan),
                     "best": by_budget[best_budget], "best_k": int(best_budget)})
    frame = pd.DataFrame(rows)
    columns = {"run": "model", "trained": "trained loops", "at_depth": "at training depth",
               "at_4x": "at 4x depth", "best": "best over the sweep", "best_k": "at loops"}
    return ("## Unrolled past the training depth\n\nThe same weights run for more loops "
            f"({quality}, `{split}`).\n\n" + _markdown(frame, columns))


def _controller_section(results: pd.DataFrame, quality: str, split: str) -> str:
    part = _pick(results, split=split)
    part = part[part["controller"] != "fixed"]
    if part.empty:
        return ""
    wanted = [quality, "mean_loops", "flops_per_token", "executed_fraction", "halted_at_cap",
              "oracle_regret", "oracle_accuracy"]
    wide = (part[part["metric"].isin(wanted)]
            .pivot_table(index=["run", "controller", "budget"], columns="metric", values="value",
                         aggfunc="mean").reset_index())
    for name in wanted:
        if name not in wide:
            wide[name] = math.nan
    columns = {"run": "model", "controller": "controller", "budget": "max loops",
               quality: quality, "mean_loops": "mean loops", "flops_per_token": "FLOPs/token",
               "executed_fraction": "executed / budget", "halted_at_cap": "at cap",
               "oracle_regret": "regret vs oracle exit (loops)",
               "oracle_accuracy": "oracle ceiling"}
    return ("## Loop controllers\n\nAdaptive controllers on each trained model (`" + split
            + "`). Regret: mean (exit loop − earliest correct loop) over samples that are "
            "correct at some loop within the budget.\n\n" + _markdown(wide, columns))


def _depth_section(samples: pd.DataFrame, split: str) -> str:
    part = samples[(samples["split"] == split) & (samples["controller"] != "fixed")]
    if part.empty:
        return ""
    table = (part.groupby(["run", "controller", "budget", "difficulty"])["depth"].mean()
             .unstack("difficulty").reset_index())
    table.columns = [str(c) for c in table.columns]
    columns = {c: (c if c in ("run", "controller", "budget") else f"d={c}") for c in table.columns}
    return ("## Mean exit depth per difficulty\n\nDo the controllers spend more loops on harder "
            "inputs?\n\n" + _markdown(table, columns))


DECODE_TITLE = "## Decode latency vs FLOPs (wall-clock, machine-dependent)"


def _decode_section(sweep: pd.DataFrame, run_dir: Path) -> str:
    """Each fixed-objective model's cached decode ms/token (``decode.json``, written by
    ``experiments.evaluate.decode``) beside its FLOPs/token, both as ratios to its arch's
    fewest loops."""
    from experiments.evaluate.decode import read_decode

    data, reason = read_decode(run_dir)
    if data is None:
        return f"{DECODE_TITLE}\n\n{reason}"
    rows = pd.DataFrame([r for r in data["rows"] if r.get("objective") == "fixed"])
    if rows.empty or sweep.empty:
        return f"{DECODE_TITLE}\n\nNo fixed-loop model was timed in this run."
    flops = sweep.set_index(["arch", "train_loops"])["flops_per_token"]
    rows["flops"] = [flops.get((a, n), math.nan) for a, n in zip(rows["arch"], rows["loops"])]
    rows = rows.sort_values(["arch", "loops"]).reset_index(drop=True)
    first = rows.groupby("arch")[["flops", "ms_per_token"]].transform("first")
    rows["flops_ratio"] = rows["flops"] / first["flops"]
    rows["ms_ratio"] = rows["ms_per_token"] / first["ms_per_token"]
    base = ", ".join(f"{a}: {int(p['loops'].min())} loop(s)" for a, p in rows.groupby("arch"))
    settings = data.get("settings", {})
    load = data.get("load_average")
    columns = {"arch": "arch", "loops": "loops", "flops": "FLOPs/token",
               "flops_ratio": "FLOPs ratio", "ms_per_token": "decode ms/token",
               "ms_ratio": "ms ratio", "mode": "decode"}
    skipped = [f"`{s['run']}` ({s['reason']})" for s in data.get("skipped", [])]
    return (f"{DECODE_TITLE}\n\nGreedy KV-cached `halting.generate` at each model's trained "
            f"loop count (fixed controller): batch {settings.get('batch', '?')} `val` prompts, "
            f"{settings.get('new_tokens', '?')} new tokens, prefill included; median of "
            f"{settings.get('reps', '?')} interleaved repetitions after a warm-up, device "
            f"{rows['device'].iloc[0]}, {rows['threads'].iloc[0]} thread(s)"
            + (f", load average {load[0]:.2f}" if load else "") + ". Ratios are to the fewest "
            f"loops ({base}); only they compare across machines. From `decode.json`, never "
            "part of the results tables.\n\n" + _markdown(rows, columns)
            + _learned_decode(data["rows"])
            + (f"\n\nNot timed: {', '.join(skipped)}." if skipped else ""))


def _learned_decode(rows: list[dict[str, Any]]) -> str:
    """The learned controllers' own per-token exits at decode vs ``fixed`` at their loop cap."""
    learned = pd.DataFrame([r for r in rows if r.get("controller", "fixed") != "fixed"])
    if learned.empty:
        return ""
    fixed = {r["run"]: r["ms_per_token"] for r in rows
             if r.get("controller") == "fixed" and r.get("mode") == "sequential"}
    learned["fixed_ms"] = [fixed.get(run, math.nan) for run in learned["run"]]
    columns = {"run": "model", "controller": "controller", "loops": "loop cap",
               "mean_depth": "mean depth used", "ms_per_token": "decode ms/token",
               "fixed_ms": "fixed(cap) ms/token", "ratio_to_fixed_cap": "ratio"}
    if "answer_accuracy" in learned:
        columns["answer_accuracy"] = "answer accuracy"
    return ("\n\nLearned halting at decode: each learned model's own controller decides every "
            "new token's depth (sequential decode, where an exit skips the loops after it), "
            "timed beside `fixed` at its loop cap in the same mode (ideal ratio: mean depth / "
            "cap).\n\n" + _markdown(learned, columns))


def _training_section(info: dict[str, Any]) -> str:
    models = info.get("models", [])
    if not models:
        return ""
    rows = pd.DataFrame([{**m, **(m.get("final") or {})} for m in models])
    for name in ("val_loss", "val_accuracy", "resumed_from"):
        if name not in rows:
            rows[name] = math.nan
    columns = {"run_id": "model", "status": "status", "val_loss": "final val loss",
               "val_accuracy": "final val accuracy", "resumed_from": "resumed from step"}
    return "## Training\n\n" + _markdown(rows, columns)


def _figures_section(run_dir: Path) -> str:
    figures = sorted((run_dir / "figures").glob("*.png"))
    if not figures:
        return ""
    return "## Figures\n\n" + "\n\n".join(
        f"### {p.stem.replace('_', ' ')}\n\n![{p.stem}](figures/{p.name})" for p in figures)
