"""``loopscope-bench``: the performance suite of GitHub issue #6, printed as a table of ratios.

Usage::

    loopscope-bench [--quick] [--only NAME[,NAME]] [--out bench.json] [--device cpu|cuda|auto]
                    [--threads N] [--reps N]
    python -m experiments.bench --quick

Runs the suite below, prints a markdown table (benchmark | what is compared | median ratio |
min-max | target | pass/fail) followed by the detail tables some benchmarks produce, and writes
``bench.json``: a list of rows, each with every column, the raw repetitions and the config.
Every number is a ratio of two measurements taken side by side in this process (A B A B ...;
see ``experiments.bench.core``), never an absolute time compared across runs. On CUDA the models
run in bf16 autocast (the solver benchmarks stay fp32, as specified). A benchmark that raises
leaves an ``error`` row and the suite continues; the exit status is then 1.

Suite (targets from issue #6):

1. ``overhead``    run_loop(fixed(k)) / hand-written step loop: <= 1.05, <= 1.3 with the trace.
2. ``compaction``  half the rows halt at loop 2, half at 16 / all rows 16 loops: <= 0.65 (ideal
                   0.5625), at sample and at token granularity (frozen-token policy).
3. ``solvers``     our best solver / torchdeq's best, evaluations and wall time to the same true
                   tolerance on four problems (three 64 x 256, issue 10's 0.97 tanh layer
                   128 x 512); fixed_point_iter bookkeeping / bare ``z = f(z)`` loop <= 1.3.
4. ``per_sample``  per-sample stopping / batch-wide stopping (row evaluations and wall time).
5. ``memory``      peak memory of a DEQ training step, implicit vs unroll at 8..64 iterations.
6. ``throughput``  training tokens/s of the looped model / an unlooped stack of R*L layers >= 0.95.
7. ``scaling``     forward cost vs loops, sequence length and batch: ratios and log-log exponent.
8. ``verdicts``    classifying an evaluation's trajectories / producing them <= 0.1.
9. ``study``       wall time of ``loopscope`` with no arguments / 300 s <= 1 (not in --quick).
10. ``study_ab``   the default study of this tree / of a baseline tree (``LOOPSCOPE_BASELINE``),
                   alternating, with its results tables compared: <= 0.5 (issue 14; not in
                   --quick, and not in the default suite: it needs the baseline checkout).
11. ``decode``     cached decoding: PLT parallel R=2 / R=1 per token <= 1.3, parallel /
                   sequential at R=2 and 4, adaptive exit / fixed at the same mean depth <= 1.2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from experiments.bench.core import BENCHMARKS, BenchConfig, Row, error_row

# name -> the module that registers it, imported only when the benchmark runs, so that one
# package failing to import costs that benchmark an ``error`` row, not the whole suite.
MODULES = {
    "overhead": "experiments.bench.loop", "compaction": "experiments.bench.loop",
    "solvers": "experiments.bench.solvers", "per_sample": "experiments.bench.solvers",
    "memory": "experiments.bench.solvers", "throughput": "experiments.bench.loop",
    "scaling": "experiments.bench.loop", "verdicts": "experiments.bench.study",
    "study": "experiments.bench.study", "study_ab": "experiments.bench.ab",
    "decode": "experiments.bench.decode",
}
ON_REQUEST = ("study_ab",)  # not in the suite; run only when named with --only
SUITE = tuple(name for name in MODULES if name not in ON_REQUEST)
KNOWN = (*SUITE, *ON_REQUEST)
NOT_QUICK = ("study",)
COLUMNS = ("benchmark", "what is compared", "median ratio", "min–max", "target", "pass/fail")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loopscope-bench",
        description="Run loopscope's benchmark suite; every figure is a side-by-side ratio.")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, few repetitions (< 2 min on 2 cores); skips 'study'")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]",
                        help=f"comma-separated subset of: {', '.join(KNOWN)}")
    parser.add_argument("--out", default="bench.json", type=Path,
                        help="where to write the rows as JSON (default: bench.json)")
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"),
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--threads", default=None, type=int,
                        help="torch.set_num_threads for the whole run (default: torch's current)")
    parser.add_argument("--reps", default=None, type=int,
                        help="timed repetitions per side (default: 5 quick, 11 full)")
    args = parser.parse_args(argv)
    args.names = select(args.only, args.quick, parser)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use cpu or auto)")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    return args


def select(only: str | None, quick: bool, parser: argparse.ArgumentParser) -> list[str]:
    """The benchmark names to run, in suite order; unknown names end with a usage error."""
    if only is None:
        return [name for name in SUITE if not (quick and name in NOT_QUICK)]
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in KNOWN]
    if unknown or not names:
        parser.error(f"--only: unknown benchmark(s) {unknown or [only]}; known: {', '.join(KNOWN)}")
    return [name for name in KNOWN if name in names]


def run_suite(names: Sequence[str], cfg: BenchConfig) -> list[Row]:
    """Run the named benchmarks in order; a benchmark that raises leaves an ``error`` row."""
    rows: list[Row] = []
    for name in names:
        started = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        torch.manual_seed(cfg.seed)
        try:
            if name not in BENCHMARKS:
                importlib.import_module(MODULES[name])
            produced = BENCHMARKS.get(name)(cfg)
        except Exception as err:  # a failing benchmark must not hide the others' results
            produced = [error_row(name, err)]
        for row in produced:
            row.config = {**row.config, "run": cfg.describe()}
        rows.extend(produced)
        print(f"[bench] {name} done in {time.perf_counter() - started:.1f} s", file=sys.stderr,
              flush=True)
    return rows


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def format_table(rows: Sequence[Row]) -> str:
    """The markdown table: one line per row, every column of ``COLUMNS``."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        spread = "—" if not math.isfinite(row.low) else f"{_number(row.low)}–{_number(row.high)}"
        status = row.status if row.status != "error" else f"error: {row.note}"
        cells = (row.benchmark, row.compared, _number(row.median), spread, row.target or "—",
                 status)
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def format_details(rows: Sequence[Row]) -> str:
    """Detail tables (``raw["table"]``: a list of dicts) that some benchmarks attach to a row."""
    blocks, shown = [], set()
    for row in rows:
        table = row.raw.get("table")
        if not table or id(table) in shown:  # rows of one measurement share their table
            continue
        shown.add(id(table))
        keys = list(table[0])
        lines = [f"{row.benchmark}: {row.compared}", "| " + " | ".join(keys) + " |",
                 "|" + "---|" * len(keys)]
        for entry in table:
            cells = [_number(v) if isinstance(v, float) else str(v) for v in entry.values()]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_json(rows: Sequence[Row], path: Path) -> None:
    """Write the rows atomically (temp file in the same directory, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps([row.to_dict() for row in rows], indent=1, allow_nan=False)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text + "\n")
    os.replace(temp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``loopscope-bench``; returns the exit status."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg = BenchConfig(quick=args.quick, device=device, threads=threads, reps=args.reps)
    rows = run_suite(args.names, cfg)
    print(format_table(rows))
    details = format_details(rows)
    if details:
        print("\n" + details)
    write_json(rows, args.out)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 1 if any(row.status == "error" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
