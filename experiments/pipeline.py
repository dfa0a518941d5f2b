"""Training and evaluating the planned models in worker processes (CPU, ``train.workers > 1``).

One pool of ``workers`` processes (one CPU thread each) runs two kinds of job:

* **train** one model (``experiments.train.train_model``: it seeds its own streams, so the
  result does not depend on the process or on ``workers``). Jobs are submitted longest first
  (cost ~ training loops; a learned objective runs every row to its cap and reads a gate), so the
  last job to finish is a short one and no core idles while one long model trains alone.
* **evaluate** one trained model on one split (``experiments.evaluate.evaluate_model`` with
  ``splits=[split]``: every split seeds its own batch, so this is exactly the sequential
  evaluation). A model's evaluation jobs are submitted as soon as its training job finishes, so
  they fill the cores training leaves idle; the hard split (longer sequences) goes first.

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

# evaluation jobs of one model, most expensive first (hard sequences are the longest)
SPLIT_COST = {"hard": 2.0, "val": 1.0, "train": 1.0}


def plan_cost(plan: Any) -> float:
    """Relative training cost of a plan: its loops, more for a learned halting objective."""
    return float(plan.loops) + (0.5 if plan.objective != "fixed" else 0.0)


def run_pool(conf: dict[str, Any], plans: list[Any], out: Path, seed: int, workers: int,
             evaluate: bool) -> tuple[dict[str, Any], dict[str, float]]:
    """Train every plan (and evaluate it, when ``evaluate``) in ``workers`` processes.

    Returns:
        run_id -> ``experiments.evaluate.Tables`` of all its splits (empty when not evaluating),
        and the worker seconds spent training and evaluating (``train_s``, ``evaluate_s``).
    """
    import multiprocessing

    from experiments.evaluate import Tables

    threads = max(1, conf["threads"])
    train_cfg = dict(conf["train"], progress=False)
    splits = sorted(conf["eval"]["splits"], key=lambda s: -SPLIT_COST.get(s, 1.0))
    jobs = len(plans) * (1 + len(splits) * evaluate)
    parts: dict[tuple[str, str], Any] = {}
    seconds = {"train_s": 0.0, "evaluate_s": 0.0}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool, \
            tqdm(total=jobs, disable=not conf["train"]["progress"], dynamic_ncols=True,
                 desc=f"train + evaluate ({workers} processes)") as bar:
        pending: dict[Future, tuple[str, Any]] = {}
        for plan in sorted(plans, key=plan_cost, reverse=True):
            future = pool.submit(_train_job, plan, train_cfg, str(out / "models" / plan.run_id),
                                 seed, threads)
            pending[future] = ("train", plan)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, item = pending.pop(future)
                result, took = future.result()  # a worker's TrainingFailed etc. is re-raised
                seconds[f"{kind}_s"] += took
                bar.update()
                if kind == "train" and evaluate:
                    for split in splits:
                        job = pool.submit(_evaluate_job, item, train_cfg,
                                          str(out / "models" / item.run_id), seed, threads,
                                          dict(conf["eval"], splits=[split]))
                        pending[job] = ("evaluate", (item.run_id, split))
                elif kind == "evaluate":
                    parts[item] = result
    tables: dict[str, Any] = {}
    for plan in plans if evaluate else []:
        tables[plan.run_id] = Tables()
        for split in conf["eval"]["splits"]:
            tables[plan.run_id].extend(parts[(plan.run_id, split)])
    return tables, seconds


def _task_of(plan: Any) -> Any:
    from experiments.tasks import build_task

    task_cfg = dict(plan.task_cfg)
    return build_task(task_cfg.pop("name"), **task_cfg)


def _train_job(plan: Any, train_cfg: dict[str, Any], model_dir: str, seed: int,
               threads: int) -> tuple[str, float]:
    from experiments.train import train_model

    _exit_with_parent()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    train_model(plan, _task_of(plan), train_cfg, Path(model_dir), seed)
    return plan.run_id, time.perf_counter() - start


def _evaluate_job(plan: Any, train_cfg: dict[str, Any], model_dir: str, seed: int,
                  threads: int, eval_cfg: dict[str, Any]) -> tuple[Any, float]:
    from experiments.evaluate import evaluate_model
    from experiments.train import train_model

    _exit_with_parent()
    torch.set_num_threads(threads)
    task = _task_of(plan)
    start = time.perf_counter()
    trained = train_model(plan, task, train_cfg, Path(model_dir), seed)  # loads the finished one
    tables = evaluate_model(trained, task, eval_cfg, seed, torch.device("cpu"),
                            eval_cfg["granularity"])
    return tables, time.perf_counter() - start


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
