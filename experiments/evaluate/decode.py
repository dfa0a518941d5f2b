"""Decode latency of every trained model: what a loop count costs when the model generates text.

``decode_rows`` times greedy, KV-cached ``halting.generate`` on each trained model at its trained
loop count with the ``fixed`` controller and each learned model under its own controller
("Rows" below), on
``eval.decode_batch`` prompts drawn from the ``val`` split; ``write_decode`` writes
them as ``decode.json`` beside ``results.parquet``, and ``report.md`` sets ms/token next to
FLOPs/token.

**Wall-clock, machine-dependent, outside the results.** The timings depend on the machine and its
load, so they never enter ``results.parquet`` (same config + seed must give bit-identical tables),
no comparison reads them, and ``eval.decode_tokens`` / ``eval.decode_batch`` are not part of the
run's fingerprint. The measurement runs in the main process after every table is computed
(with ``train.workers > 1`` the worker pool has finished, so the models are timed one at a time on
an otherwise idle process), under ``torch.random.fork_rng`` so it leaves torch's global RNG as it
found it.

**What is timed.** One call is ``generate(model, prompts, controller, max_new_tokens=N,
max_loops=loops)`` — the prefill of the prompts plus N new tokens. The prompts are the task's
``val`` inputs up to their answer (``decode_prompts``): a task scored at answer positions
(parity's ``=``, addition's answer slots, s5's every prefix) gives each row's input through its
last supervised position, so the first generated token is the model's answer there
(``answer_accuracy`` of the row checks it against the target); the N - 1 tokens after it time
steady-state decoding (these tasks are not autoregressive, so they are off-task but cost what any
decode step costs). A language-modelling task (``metric == "bits_per_byte"``) gives a text prefix
and generates its continuation. N is ``eval.decode_tokens``, lowered to what fits
``max_seq_len`` after the longest prompt (never the prompt cut instead).

**Rows.** Every model is decoded with ``fixed`` at its trained loop count (``mode="auto"``: PLT
decodes its loops in one batched forward) — ``controller`` ``fixed``. A model trained with a
learned-halting objective whose controller decides per token (``ouro_gate``, ``act``, ...) also
gets a row decoded with that trained controller at its loop cap (``controller`` = its name,
``mode="sequential"``, where an exit saves the loops after it; ``mean_depth`` is the depth it
used) and one with ``fixed`` at the cap in the same mode, so ``ratio_to_fixed_cap`` compares time
at the depth used with time at the cap; a controller that cannot decide per token is listed in
``skipped`` with the reason. The rows are measured side by side
(``experiments.bench.core.alternate``: one warm-up round, then 3 interleaved rounds A B C A B
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

from common.constants import IGNORE_INDEX

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
        ``{"rows": [...], "skipped": [...], "settings": {...}}``: the rows (module docstring,
        "Rows"), and each model or controller that was not decoded with the reason.
    """
    from experiments.bench.core import BenchConfig, alternate
    from halting.generate import token_refusal

    wanted, batch = int(eval_cfg["decode_tokens"]), int(eval_cfg["decode_batch"])
    skipped = [{"run": t.plan.run_id, "arch": t.plan.arch,
                "reason": f"{type(t.model).__name__} does not support cached decoding"}
               for t in trained if not callable(getattr(t.model, "new_decode_cache", None))]
    timed = [t for t in trained if callable(getattr(t.model, "new_decode_cache", None))]
    max_len = min((_max_seq_len(t.model, task) for t in timed), default=task.seq_len)
    prompts, answers, new = decode_prompts(task, batch, wanted, seed, max_len)
    settings = {"split": DECODE_SPLIT, "batch": len(prompts), "new_tokens": new,
                "prompt_lengths": [int(p.numel()) for p in prompts],
                "prompt": "text prefix" if answers is None else "input through its answer",
                "controller": "fixed, and each learned model's own controller",
                "reps": DECODE_REPS, "warmup": 1, "statistic": "median"}
    if not timed or new == 0:
        return {"rows": [], "skipped": skipped, "settings": settings}
    bench = BenchConfig(quick=True, device=device, threads=torch.get_num_threads(), warmup=1,
                        reps=DECODE_REPS, seed=seed)
    prompts = [p.to(device) for p in prompts]
    cases: dict[str, tuple[Any, str, str]] = {}  # key -> (trained, controller, mode)
    for t in timed:
        cases[t.plan.run_id] = (t, "fixed", "auto")
        if t.plan.objective == "fixed":
            continue
        reason = token_refusal(t.controller)
        if reason:
            skipped.append({"run": t.plan.run_id, "arch": t.plan.arch,
                            "controller": t.plan.objective, "reason": reason})
            continue
        cases[f"{t.plan.run_id}/{t.plan.objective}"] = (t, "learned", "sequential")
        cases[f"{t.plan.run_id}/fixed_sequential"] = (t, "fixed", "sequential")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        calls = {key: _call(bench, t, prompts, new, which, mode)
                 for key, (t, which, mode) in cases.items()}
        times = alternate(calls, bench)
        outputs = {key: call() for key, call in calls.items()}
    ms = {key: 1e3 * statistics.median(times[key]) / new for key in cases}
    rows = []
    for key, (t, which, _mode) in cases.items():
        out = outputs[key]
        row = {"run": t.plan.run_id, "arch": t.plan.arch, "objective": t.plan.objective,
               "controller": t.plan.objective if which == "learned" else "fixed",
               "loops": int(t.plan.loops), "batch": len(prompts), "new_tokens": new,
               "ms_per_token": ms[key], "mean_depth": out.mean_depth, "mode": out.mode,
               "device": str(device), "threads": torch.get_num_threads(),
               "seconds": [float(s) for s in times[key]]}
        if which == "learned":
            row["ratio_to_fixed_cap"] = ms[key] / ms[f"{t.plan.run_id}/fixed_sequential"]
        if answers is not None:
            row["answer_accuracy"] = float((out.tokens[:, 0].cpu() == answers).float().mean())
        rows.append(row)
    return {"rows": rows, "skipped": skipped, "settings": settings}


def decode_prompts(task: Any, batch: int, wanted: int, seed: int, max_len: int | None = None
                   ) -> tuple[list[torch.Tensor], torch.Tensor | None, int]:
    """``batch`` val prompts, their answers and the new-token count that fits ``max_len``.

    A task scored at answer positions gives each row's input through its last supervised
    position (parity: the bits and ``=``), and ``answers`` (B,) holds the target there — what the
    first generated token should be. A language-modelling task (``metric == "bits_per_byte"``)
    gives each row's first ``max_len + 1 - wanted`` tokens (at least one) and ``answers`` None.
    The count is ``wanted`` lowered to ``max_len + 1 - longest prompt`` (``generate`` feeds every
    new token but the last back), so the prompts are never cut to make room.
    """
    max_len = task.seq_len if max_len is None else int(max_len)
    generator = torch.Generator().manual_seed(seed * 7_919 + 211)
    drawn = task.batch(DECODE_SPLIT, batch, generator)
    lengths = [_length(row, task.pad_id) for row in drawn.tokens]
    if getattr(task, "metric", "accuracy") == "bits_per_byte":
        keep = max(1, max_len + 1 - wanted)
        prompts = [row[: min(n, keep)].clone() for row, n in zip(drawn.tokens, lengths)]
        answers = None
    else:
        ends = []
        for b, (target, n) in enumerate(zip(drawn.targets, lengths)):
            supervised = (target[:n] != IGNORE_INDEX).nonzero()
            if not len(supervised):
                raise ValueError(f"task {task.name!r}: val row {b} has no supervised position, "
                                 "so it has no answer to decode")
            ends.append(int(supervised[-1]) + 1)
        prompts = [row[:end].clone() for row, end in zip(drawn.tokens, ends)]
        answers = torch.stack([target[end - 1] for target, end in zip(drawn.targets, ends)])
    room = max_len + 1 - max(int(p.numel()) for p in prompts)
    return prompts, answers, max(0, min(wanted, room))


def _length(row: torch.Tensor, pad_id: int) -> int:
    pads = (row == pad_id).nonzero()
    return int(pads[0]) if len(pads) else row.numel()  # right-padded


def _max_seq_len(model: Any, task: Any) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_seq_len", None) or task.seq_len)


def _call(bench: Any, trained: Any, prompts: list[torch.Tensor], new: int, which: str,
          mode: str) -> Any:
    from halting import generate

    generator = torch.Generator(device=prompts[0].device).manual_seed(bench.seed)
    controller = trained.controller if which == "learned" else "fixed"

    def run() -> Any:
        generator.manual_seed(bench.seed)  # recurrent_depth's random initial state
        with bench.autocast():
            return generate(trained.model, prompts, controller, max_new_tokens=new,
                            max_loops=int(trained.plan.loops), generator=generator, mode=mode)

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
