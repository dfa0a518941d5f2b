"""Decode latency of every trained model: what a loop count costs when the model generates text.

``decode_rows`` times greedy, KV-cached ``halting.generate`` on each trained model at its trained
loop count with the ``fixed`` controller (``mode="auto"``: PLT decodes its loops in one batched
forward), on ``eval.decode_batch`` prompts drawn from the ``val`` split; ``write_decode`` writes
them as ``decode.json`` beside ``results.parquet``, and ``report.md`` sets ms/token next to
FLOPs/token.

**Wall-clock, machine-dependent, outside the results.** The timings depend on the machine and its
load, so they never enter ``results.parquet`` (same config + seed must give bit-identical tables),
no comparison reads them, and ``eval.decode_tokens`` / ``eval.decode_batch`` are not part of the
run's fingerprint. The measurement runs in the main process after every table is computed
(with ``train.workers > 1`` the worker pool has finished, so the models are timed one at a time on
an otherwise idle process), under ``torch.random.fork_rng`` so it leaves torch's global RNG as it
found it.

**What is timed.** One call is ``generate(model, prompts, "fixed", max_new_tokens=N,
max_loops=loops)`` — the prefill of the prompts (each val row's tokens up to its first padding,
cut so that prompt + N fits ``max_seq_len``) plus N new tokens. The models are measured side by
side (``experiments.bench.core.alternate``: one warm-up round, then 3 interleaved rounds A B C A B
C ..., each measurement repeated until it lasts >= 20 ms), and a row reports the median of the 3
over N: ``ms_per_token`` (prefill included). Compare ratios between rows of one run, not numbers
across machines.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

DECODE_FILE = "decode.json"
DECODE_SPLIT = "val"
DECODE_REPS = 3


def decode_rows(trained: list[Any], task: Any, eval_cfg: dict[str, Any], seed: int,
                device: torch.device) -> dict[str, Any]:
    """Time cached greedy decoding of every trained model (see the module docstring).

    Args:
        trained: ``experiments.train.TrainResult`` of every model, in plan order.
        task: the task they were trained on (its ``val`` split gives the prompts).
        eval_cfg: the validated ``eval`` section (``decode_tokens``, ``decode_batch``).
        seed: the run's seed (the prompts are the same for every model).
        device: where the models are.

    Returns:
        ``{"rows": [...], "skipped": [...], "settings": {...}}``: one row per timed model, and
        each model that was not timed with the reason (no cached decoding).
    """
    from experiments.bench.core import BenchConfig, alternate

    wanted, batch = int(eval_cfg["decode_tokens"]), int(eval_cfg["decode_batch"])
    skipped = [{"run": t.plan.run_id, "arch": t.plan.arch,
                "reason": f"{type(t.model).__name__} does not support cached decoding"}
               for t in trained if not callable(getattr(t.model, "new_decode_cache", None))]
    timed = [t for t in trained if callable(getattr(t.model, "new_decode_cache", None))]
    prompts, new = decode_prompts(task, batch, wanted, seed)
    settings = {"split": DECODE_SPLIT, "batch": len(prompts), "new_tokens": new,
                "prompt_lengths": [int(p.numel()) for p in prompts], "controller": "fixed",
                "reps": DECODE_REPS, "warmup": 1, "statistic": "median"}
    if not timed or new == 0:
        return {"rows": [], "skipped": skipped, "settings": settings}
    bench = BenchConfig(quick=True, device=device, threads=torch.get_num_threads(), warmup=1,
                        reps=DECODE_REPS, seed=seed)
    prompts = [p.to(device) for p in prompts]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        cases = {t.plan.run_id: _call(bench, t, prompts, new) for t in timed}
        times = alternate(cases, bench)
        outputs = {t.plan.run_id: cases[t.plan.run_id]() for t in timed}
    rows = []
    for t in timed:
        out = outputs[t.plan.run_id]
        seconds = statistics.median(times[t.plan.run_id])
        rows.append({"run": t.plan.run_id, "arch": t.plan.arch, "objective": t.plan.objective,
                     "loops": int(t.plan.loops), "batch": len(prompts), "new_tokens": new,
                     "ms_per_token": 1e3 * seconds / new, "mean_depth": out.mean_depth,
                     "mode": out.mode, "device": str(device),
                     "threads": torch.get_num_threads(),
                     "seconds": [float(s) for s in times[t.plan.run_id]]})
    return {"rows": rows, "skipped": skipped, "settings": settings}


def decode_prompts(task: Any, batch: int, wanted: int, seed: int) -> tuple[list[torch.Tensor],
                                                                           int]:
    """``batch`` val prompts (each row up to its first padding) and the new-token count that fits.

    The prompts are cut to at most ``task.seq_len + 1 - wanted`` tokens (``generate`` feeds every
    new token but the last back); when even one prompt token leaves no room for ``wanted`` new
    ones, the count is lowered to ``task.seq_len``.
    """
    generator = torch.Generator().manual_seed(seed * 7_919 + 211)
    tokens = task.batch(DECODE_SPLIT, batch, generator).tokens
    new = min(wanted, task.seq_len)
    room = task.seq_len + 1 - new
    prompts = []
    for row in tokens:
        pads = (row == task.pad_id).nonzero()
        length = int(pads[0]) if len(pads) else row.numel()  # right-padded
        prompts.append(row[: max(1, min(length, room))].clone())
    return prompts, new


def _call(bench: Any, trained: Any, prompts: list[torch.Tensor], new: int) -> Any:
    from halting import generate

    generator = torch.Generator(device=prompts[0].device).manual_seed(bench.seed)

    def run() -> Any:
        generator.manual_seed(bench.seed)  # recurrent_depth's random initial state
        with bench.autocast():
            return generate(trained.model, prompts, "fixed", max_new_tokens=new,
                            max_loops=int(trained.plan.loops), generator=generator)

    return run


def write_decode(out: Path, measured: dict[str, Any]) -> Path:
    """Write ``decode.json`` atomically (``experiments.results.atomic_write_text``)."""
    from experiments.results import atomic_write_text

    note = ("wall-clock decode latency, machine- and load-dependent (compare ratios between "
            "rows); not part of results.parquet or the run fingerprint")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload = {"note": note, "load_average": list(load) if load else None, **measured}
    return atomic_write_text(out / DECODE_FILE, json.dumps(payload, indent=1))


def read_decode(run_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, str]:
    """``decode.json`` (``rows``, ``skipped``, ``settings``), or ``None`` and the one-line reason
    it is missing."""
    path = Path(run_dir) / DECODE_FILE
    if not path.is_file():
        return None, (f"No `{DECODE_FILE}` in this run directory (eval.decode_tokens=0, or a run "
                      "made before decode timing): decode latency was not measured.")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise ValueError("expected an object with a list of rows")
    except (OSError, ValueError) as err:
        return None, f"`{DECODE_FILE}` cannot be read ({type(err).__name__}: {err})."
    return data, ""
