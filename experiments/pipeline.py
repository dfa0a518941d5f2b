"""Training and evaluating the planned models in worker processes (CPU, ``train.workers > 1``).

One pool of ``workers`` processes (one CPU thread each) runs two kinds of job:

* **train** one model (``experiments.train.train_model``: it seeds its own streams, so the
  result does not depend on the process or on ``workers``). Training jobs go first, longest
  first (cost ~ training loops; a learned objective runs every row to its cap and reads a gate).
* **evaluate** one trained model on one split (``experiments.evaluate.evaluate_model`` with
  ``splits=[split]``: every split seeds its own batch, so this is exactly the sequential
  evaluation). A model's evaluation jobs are queued as soon as its training job finishes and run
  when no training job is waiting, most expensive first (``SPLIT_COST``: the hard split's longer
  sequences), so the last job to finish is a short one and no core idles while a long one runs
  alone.

Only as many jobs as processes are in the pool at once; the queue above is kept here, so its
priorities decide what a freed process runs next. Each job's start, end and CPU seconds are in
run.json (``timing.pool.jobs``).

The tables come back by pickle and are assembled in plan order, split order — the order the
sequential path writes — so ``results.parquet`` does not depend on ``workers``.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

# relative cost of evaluating one split (hard sequences are the longest: measured on the default
# study ~10.5 s per model against ~3 s for val)
SPLIT_COST = {"hard": 3.5, "val": 1.0, "train": 1.0}


def plan_cost(plan: Any) -> float:
    """Relative training cost of a plan: its loops, more for a learned halting objective."""
    return float(plan.loops) + (0.5 if plan.objective != "fixed" else 0.0)


def run_pool(conf: dict[str, Any], plans: list[Any], out: Path, seed: int, workers: int,
             evaluate: bool) -> tuple[dict[str, Any], dict[str, float]]:
    """Train every plan (and evaluate it, when ``evaluate``) in ``workers`` processes.

    Returns:
        run_id -> ``experiments.evaluate.Tables`` of all its splits (empty when not evaluating),
        and the worker seconds spent training and evaluating (``train_s``, ``evaluate_s``; their
        CPU seconds ``train_cpu_s``, ``evaluate_cpu_s``), the pool's wall seconds (``wall_s``)
        and every job's ``[kind, run_id, split, start_s, end_s, cpu_s]`` (``jobs``: start and end
        as seen by this process, from the pool's start) — run.json's ``timing.pool``.
    """
    import multiprocessing

    from experiments.evaluate import Tables

    threads = max(1, conf["threads"])
    train_cfg = dict(conf["train"], progress=False)
    splits = sorted(conf["eval"]["splits"], key=lambda s: -SPLIT_COST.get(s, 1.0))
    jobs = len(plans) * (1 + len(splits) * evaluate)
    parts: dict[tuple[str, str], Any] = {}
    seconds: dict[str, Any] = {"train_s": 0.0, "evaluate_s": 0.0, "train_cpu_s": 0.0,
                               "evaluate_cpu_s": 0.0, "jobs": []}
    opened = time.perf_counter()
    # forked where the platform allows it: a worker starts with torch and this package already
    # imported (a spawned one spends ~2 s importing them before its first job)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # jobs waiting for a free process, by priority: every training job (longest first) before
    # any evaluation, evaluations most expensive first; only as many jobs as processes are ever
    # submitted, so this order (not the pool's FIFO queue) decides, and the last job to finish
    # is a short one
    queued: list[tuple[tuple[float, ...], str, Any]] = []
    for order, plan in enumerate(plans):
        queued.append(((0, -plan_cost(plan), order), "train", plan))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool, \
            tqdm(total=jobs, disable=not conf["train"]["progress"], dynamic_ncols=True,
                 desc=f"train + evaluate ({workers} processes)") as bar:
        pending: dict[Future, tuple[str, Any]] = {}

        def submit_next() -> None:
            while queued and len(pending) < workers:
                queued.sort(key=lambda entry: entry[0])
                _, kind, item = queued.pop(0)
                if kind == "train":
                    future = pool.submit(_train_job, item, train_cfg,
                                         str(out / "models" / item.run_id), seed, threads)
                    pending[future] = ("train", item)
                else:
                    plan, split = item
                    future = pool.submit(_evaluate_job, plan, train_cfg,
                                         str(out / "models" / plan.run_id), seed, threads,
                                         dict(conf["eval"], splits=[split]))
                    pending[future] = ("evaluate", (plan.run_id, split))

        submit_next()
        _import_what_follows(conf)  # while the workers run
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, item = pending.pop(future)
                result, took, cpu = future.result()  # a worker's TrainingFailed etc. is re-raised
                seconds[f"{kind}_s"] += took
                seconds[f"{kind}_cpu_s"] += cpu
                ended = time.perf_counter() - opened
                run_id, split = (item.run_id, "") if kind == "train" else item
                seconds["jobs"].append([kind, run_id, split, round(ended - took, 3),
                                        round(ended, 3), round(cpu, 3)])
                bar.update()
                if kind == "train" and evaluate:
                    for split in splits:
                        queued.append(((1, -SPLIT_COST.get(split, 1.0), len(seconds["jobs"])),
                                       "evaluate", (item, split)))
                elif kind == "evaluate":
                    parts[item] = result
            submit_next()
    seconds["wall_s"] = time.perf_counter() - opened
    tables: dict[str, Any] = {}
    for plan in plans if evaluate else []:
        tables[plan.run_id] = Tables()
        for split in conf["eval"]["splits"]:
            tables[plan.run_id].extend(parts[(plan.run_id, split)])
    return tables, seconds


def _import_what_follows(conf: dict[str, Any]) -> None:
    """Import, in this otherwise waiting process, what it runs once the pool is done (decode
    timing, figures — matplotlib alone ~0.5 s —, the report), so that no core idles on imports
    after the last job; the figure helpers, forked from this process, inherit them."""
    import experiments.bench.core  # noqa: F401  (decode timing)
    import experiments.evaluate.decode  # noqa: F401
    import experiments.results.report  # noqa: F401
    import halting.generate  # noqa: F401

    if conf["eval"]["figures"]:
        import experiments.figures  # noqa: F401


def _task_of(plan: Any) -> Any:
    from experiments.tasks import build_task

    task_cfg = dict(plan.task_cfg)
    return build_task(task_cfg.pop("name"), **task_cfg)


def _train_job(plan: Any, train_cfg: dict[str, Any], model_dir: str, seed: int,
               threads: int) -> tuple[str, float, float]:
    from experiments.train import train_model

    _exit_with_parent()
    torch.set_num_threads(threads)
    start, cpu = time.perf_counter(), time.process_time()
    train_model(plan, _task_of(plan), train_cfg, Path(model_dir), seed)
    return plan.run_id, time.perf_counter() - start, time.process_time() - cpu


def _evaluate_job(plan: Any, train_cfg: dict[str, Any], model_dir: str, seed: int,
                  threads: int, eval_cfg: dict[str, Any]) -> tuple[Any, float, float]:
    from experiments.evaluate import evaluate_model
    from experiments.train import train_model

    _exit_with_parent()
    torch.set_num_threads(threads)
    task = _task_of(plan)
    start, cpu = time.perf_counter(), time.process_time()
    trained = train_model(plan, task, train_cfg, Path(model_dir), seed)  # loads the finished one
    tables = evaluate_model(trained, task, eval_cfg, seed, torch.device("cpu"),
                            eval_cfg["granularity"])
    return tables, time.perf_counter() - start, time.process_time() - cpu


_WATCHING: list[bool] = []  # the watcher runs once per worker process


def _exit_with_parent() -> None:
    """Stop this worker when the main process dies (a killed run must not leave trainers behind
    writing checkpoints that a re-run is resuming from)."""
    if _WATCHING:
        return
    _WATCHING.append(True)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
