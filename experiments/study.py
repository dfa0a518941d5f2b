"""Running a study: ``run(cfg) -> dict``, what ``loopscope`` (``experiments.cli.app``) calls.

``run`` is plain Python (testable without Hydra's command line: compose a config with
``hydra.compose`` and call ``run(cfg, out_dir=...)``).

``run``: validate -> train every planned model (``experiments.train``; resumes from checkpoints,
skips finished ones) -> evaluate each (``experiments.evaluate``) -> ``results.parquet``,
``traces.parquet``, ``samples.parquet`` -> figures (``experiments.figures.draw_all``) ->
``report.md`` (``experiments.results.report``) -> ``status.json`` = finished. A run directory whose
``status.json`` says finished is skipped (re-running a killed multirun in the same sweep directory
finishes only the missing jobs). In a multirun each job's seed is derived from the base seed and
the job number (``job_seed``). Under ``torchrun`` every rank trains, rank 0 alone evaluates and
writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from experiments.config.validate import ConfigError, ValidConfig, validate_config
from experiments.errors import LoopscopeError


def job_seed(base: int, job_num: int | None) -> int:
    """Seed of multirun job ``job_num`` (job 0 and single runs keep the base seed)."""
    return base if not job_num else (base + 10_007 * job_num) % (2**31 - 1)


# -- the plain run ---------------------------------------------------------------------------------
def run(cfg: DictConfig | Mapping[str, Any], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the configured study end to end; return a summary dict (see module docstring).

    Args:
        cfg: a composed config (``hydra.compose(...)``) or the task function's config.
        out_dir: where to write; default ``cfg.out_dir``, else Hydra's output directory.

    Raises:
        ConfigError: the config is invalid (one-line message).
        experiments.train.TrainingFailed: a model's loss became NaN/Inf.
    """
    from experiments.train import init_distributed, read_status, resolve_device, write_status

    started = time.perf_counter()
    valid = validate_config(cfg)
    conf = valid.cfg
    out = _output_dir(conf, out_dir)
    previous = read_status(out)
    if previous and previous.get("status") == "finished":
        print(f"loopscope: {out} already finished; skipped (delete its status.json to rerun)")
        return {"out_dir": str(out), "status": "finished", "skipped": True}
    if conf["threads"]:
        torch.set_num_threads(conf["threads"])
    dist_info = init_distributed(conf["train"]["device"])
    device = resolve_device(conf["train"]["device"], dist_info)
    seed = job_seed(conf["seed"], hydra_job_num())
    if dist_info.is_main:
        print(f"loopscope: study {conf['study']['name']!r} -> {out}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        write_status(out, "running", seed=seed)
    trained = _train_all(conf, valid, out, seed, dist_info)
    if not dist_info.is_main:
        _finish_distributed(dist_info)
        return {"out_dir": str(out), "status": "finished", "rank": dist_info.rank}
    summary = _evaluate_and_write(conf, valid, trained, out, seed, device, started)
    _finish_distributed(dist_info)
    return summary


def _output_dir(conf: dict[str, Any], out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if conf["out_dir"]:
        return Path(conf["out_dir"])
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("out_dir is null and no Hydra run is active; pass out_dir=PATH")


def hydra_job_num() -> int | None:
    """This job's number in a Hydra multirun; ``None`` outside one (a single run or no Hydra)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return int(hc.job.num) if hc.mode == RunMode.MULTIRUN else None


def plan_models(conf: dict[str, Any], valid: ValidConfig) -> list[Any]:
    """The models to train, in order (see the comment at the top of ``conf/config.yaml``)."""
    from experiments.train import TrainPlan

    study, controller = conf["study"], conf["controller"]
    plans: dict[str, TrainPlan] = {}
    for key, fields in valid.models.items():
        objectives = []
        if controller["name"] == "fixed":
            for loops in study["train_loops"] or [controller["loops"]]:
                objectives.append(("fixed", {"name": "fixed"}, loops))
        else:
            objectives.append((controller["name"], controller, study["max_loops"]))
        objectives += [(name, cfg, study["max_loops"]) for name, cfg in study["learned"].items()]
        for objective, cfg, loops in objectives:
            run_id = f"{key}-{objective}-L{loops}"
            plans[run_id] = TrainPlan(run_id, fields["arch"], dict(fields), objective, dict(cfg),
                                      int(loops), dict(conf["task"]))
    return list(plans.values())


def _train_all(conf: dict[str, Any], valid: ValidConfig, out: Path, seed: int,
               dist_info: Any) -> list[Any]:
    from experiments.train import TrainingFailed, train_model, write_status

    plans = plan_models(conf, valid)
    workers = min(conf["train"]["workers"], len(plans))
    if workers > 1 and not dist_info.enabled and conf["train"]["device"] in ("auto", "cpu") \
            and not torch.cuda.is_available():
        _train_in_parallel(conf, plans, out, seed, workers)  # the loop below then loads them
    trained = []
    show = conf["train"]["progress"] and dist_info.is_main
    for plan in tqdm(plans, desc="models", disable=not show, dynamic_ncols=True):
        try:
            trained.append(train_model(plan, valid.task, conf["train"],
                                       out / "models" / plan.run_id, seed, dist_info))
        except TrainingFailed as err:
            if dist_info.is_main:
                write_status(out, "failed", step=err.step, model=plan.run_id,
                             checkpoint=err.checkpoint, message=str(err))
            raise
        except LoopscopeError as err:  # an unreadable or mismatched checkpoint: left as it is
            if dist_info.is_main:
                write_status(out, "failed", model=plan.run_id, message=str(err))
            raise
    return trained


def _train_in_parallel(conf: dict[str, Any], plans: list[Any], out: Path, seed: int,
                       workers: int) -> None:
    """Train independent models in ``workers`` processes (one CPU thread each).

    Each worker seeds exactly as the sequential path does (``train_model`` seeds its own
    streams), so results do not depend on ``workers``. A worker's ``TrainingFailed`` is re-raised.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    quiet = dict(conf["train"], progress=False)
    show = conf["train"]["progress"]
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_train_worker, plan, quiet, str(out / "models" / plan.run_id),
                               seed, max(1, conf["threads"])) for plan in plans]
        for future in tqdm(as_completed(futures), total=len(futures), disable=not show,
                           desc=f"train ({workers} processes)", dynamic_ncols=True):
            future.result()


def _train_worker(plan: Any, train_cfg: dict[str, Any], model_dir: str, seed: int,
                  threads: int) -> str:
    from experiments.tasks import build_task
    from experiments.train import train_model

    _exit_with_parent()
    torch.set_num_threads(threads)
    task_cfg = dict(plan.task_cfg)
    task = build_task(task_cfg.pop("name"), **task_cfg)
    train_model(plan, task, train_cfg, Path(model_dir), seed)
    return plan.run_id


def _exit_with_parent() -> None:
    """Stop this worker when the main process dies (a killed run must not leave trainers behind
    writing checkpoints that a re-run is resuming from)."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _finish_distributed(dist_info: Any) -> None:
    if dist_info.enabled and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _evaluate_and_write(conf: dict[str, Any], valid: ValidConfig, trained: list[Any], out: Path,
                        seed: int, device: torch.device, started: float) -> dict[str, Any]:
    from experiments.evaluate import Tables, evaluate_model
    from experiments.figures import draw_all
    from experiments.results import atomic_write_text, write_parquet
    from experiments.results.report import write_report
    from experiments.train import write_status

    tables = Tables()
    show = conf["train"]["progress"]
    for result in tqdm(trained, desc="evaluate", disable=not show, dynamic_ncols=True):
        tables.extend(evaluate_model(result, valid.task, conf["eval"], seed, device,
                                     conf["eval"]["granularity"]))
    frames = tables.frames()
    for name, frame in frames.items():
        write_parquet(frame, out / f"{name}.parquet")
    info = _run_info(conf, trained, seed, device, started)
    atomic_write_text(out / "run.json", json.dumps(info, indent=1, default=str))
    skipped: dict[str, str] = {}
    figures = draw_all(out, skipped=skipped) if conf["eval"]["figures"] else []
    info["wall_seconds"] = time.perf_counter() - started
    info["figures_skipped"] = skipped
    atomic_write_text(out / "run.json", json.dumps(info, indent=1, default=str))
    report = write_report(out)
    write_status(out, "finished", seed=seed, wall_seconds=info["wall_seconds"])
    print(f"loopscope: finished in {info['wall_seconds']:.1f} s; report: {report}", flush=True)
    return {"out_dir": str(out), "status": "finished", "seed": seed,
            "wall_seconds": info["wall_seconds"], "report": str(report),
            "figures": [str(p) for p in figures],
            "rows": {name: len(frame) for name, frame in frames.items()}}


def _run_info(conf: dict[str, Any], trained: list[Any], seed: int, device: torch.device,
              started: float) -> dict[str, Any]:
    models = [{"run_id": t.plan.run_id, "arch": t.plan.arch, "objective": t.plan.objective,
               "train_loops": t.plan.loops, "status": t.status, "resumed_from": t.resumed_from,
               "final": t.history[-1] if t.history else None,
               # declared by the model (models.LoopedModel); report.md reads it, not the arch name
               "nilpotent_step": bool(t.model.nilpotent_step)} for t in trained]
    return {"config": conf, "seed": seed, "device": str(device),
            "threads": torch.get_num_threads(), "models": models,
            "wall_seconds": time.perf_counter() - started}
