"""Running a study: ``run(cfg) -> dict``, what ``loopscope`` (``experiments.cli.app``) calls.

``run`` is plain Python (testable without Hydra's command line: compose a config with
``hydra.compose`` and call ``run(cfg, out_dir=...)``).

``run``: validate -> train every planned model (``experiments.train``; resumes from checkpoints,
skips finished ones) -> evaluate each (``experiments.evaluate``) -> ``results.parquet``,
``traces.parquet``, ``samples.parquet`` -> ``decode.json`` (wall-clock decode latency,
``experiments.evaluate.decode``; outside the tables and the fingerprint) -> figures
(``experiments.figures.draw_all``) -> ``report.md`` (``experiments.results.report``) ->
``status.json`` = finished. A run directory whose
``status.json`` says finished is skipped (re-running a killed multirun in the same sweep directory
finishes only the missing jobs). In a multirun each job's seed is derived from the base seed and
the job number (``job_seed``). Under ``torchrun`` every rank trains, rank 0 alone evaluates and
writes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from experiments.config.validate import ConfigError, ValidConfig, validate_config
from experiments.errors import LoopscopeError
from experiments.results.rundir import check_fingerprint, prepare_out_dir, result_config, run_lock

# seconds per stage of the current run (main process; "pool": worker seconds training and
# evaluating when train.workers > 1), recorded in run.json as "timing"
TIMING: dict[str, Any] = {}


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
    TIMING.clear()
    valid = validate_config(cfg)
    conf = valid.cfg
    out = _output_dir(conf, out_dir)
    if conf["threads"]:
        torch.set_num_threads(conf["threads"])
    dist_info = init_distributed(conf["train"]["device"])
    seed = job_seed(conf["seed"], hydra_job_num())
    if not dist_info.is_main:  # rank 0 owns the directory (lock, fingerprint, status)
        _train_all(conf, valid, out, seed, dist_info)
        _finish_distributed(dist_info)
        return {"out_dir": str(out), "status": "finished", "rank": dist_info.rank}
    prepare_out_dir(out)
    with run_lock(out):
        check_fingerprint(out, result_config(conf, seed))
        previous = read_status(out)
        if previous and previous.get("status") == "finished":
            print(f"loopscope: {out} already finished; skipped (delete its status.json to rerun)")
            return {"out_dir": str(out), "status": "finished", "skipped": True}
        device = resolve_device(conf["train"]["device"], dist_info)
        print(f"loopscope: study {conf['study']['name']!r} -> {out}", flush=True)
        write_status(out, "running", seed=seed)
        try:
            trained, evaluated = _train_all(conf, valid, out, seed, dist_info)
            summary = _evaluate_and_write(conf, valid, trained, out, seed, device, started,
                                          evaluated)
        except BaseException as err:
            _record_failure(out, err)
            raise
    _finish_distributed(dist_info)
    return summary


def _record_failure(out: Path, err: BaseException) -> None:
    """Leave status.json at "failed" with the reason (a more detailed record written by the
    training loop, with step and checkpoint, is kept)."""
    from experiments.errors import one_line
    from experiments.train import read_status, write_status

    current = read_status(out) or {}
    if current.get("status") == "failed":
        return
    reason = "interrupted" if isinstance(err, KeyboardInterrupt) else one_line(err)
    write_status(out, "failed", error=type(err).__name__, message=reason)


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
    from experiments.config.validate import AS_LOADED
    from experiments.train import TrainPlan

    study, controller = conf["study"], conf["controller"]
    plans: dict[str, TrainPlan] = {}
    for key, fields in valid.models.items():
        if AS_LOADED in fields:  # a checkpoint evaluated as loaded: one model, nothing trained
            loops = fields[AS_LOADED]
            build = {k: v for k, v in fields.items() if k != AS_LOADED}
            run_id = f"{key}-fixed-L{loops}"
            plans[run_id] = TrainPlan(run_id, fields["arch"], build, "fixed", {"name": "fixed"},
                                      int(loops), dict(conf["task"]), finetune=False)
            continue
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
               dist_info: Any) -> tuple[list[Any], dict[str, Any] | None]:
    """Train (or reload) every planned model; returns them in plan order, with each one's
    evaluation tables when the worker pool already evaluated them (else None)."""
    from experiments.pipeline import run_pool
    from experiments.train import TrainingFailed, train_model, write_status

    plans = plan_models(conf, valid)
    workers = min(conf["train"]["workers"], len(plans))
    evaluated = None
    if workers > 1 and not dist_info.enabled and conf["train"]["device"] in ("auto", "cpu") \
            and not torch.cuda.is_available():
        # the loop below then loads the trained models; the tables come from the pool
        evaluated, TIMING["pool"] = run_pool(conf, plans, out, seed, workers,
                                             evaluate=dist_info.is_main)
    trained = []
    started = time.perf_counter()
    show = conf["train"]["progress"] and dist_info.is_main and evaluated is None
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
    TIMING["train_s"] = time.perf_counter() - started
    return trained, evaluated


def _finish_distributed(dist_info: Any) -> None:
    if dist_info.enabled and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _evaluate_and_write(conf: dict[str, Any], valid: ValidConfig, trained: list[Any], out: Path,
                        seed: int, device: torch.device, started: float,
                        evaluated: dict[str, Any] | None = None) -> dict[str, Any]:
    from experiments.evaluate import Tables, evaluate_model
    from experiments.figures import draw_all
    from experiments.results import atomic_write_text, write_parquet
    from experiments.results.report import write_report
    from experiments.train import write_status

    tables = Tables()
    evaluating = time.perf_counter()
    show = conf["train"]["progress"] and evaluated is None
    for result in tqdm(trained, desc="evaluate", disable=not show, dynamic_ncols=True):
        if evaluated is not None:  # evaluated by the worker pool, in this same order
            tables.extend(evaluated[result.plan.run_id])
            continue
        tables.extend(evaluate_model(result, valid.task, conf["eval"], seed, device,
                                     conf["eval"]["granularity"]))
    TIMING["evaluate_s"] = time.perf_counter() - evaluating
    frames = tables.frames()
    for name, frame in frames.items():
        write_parquet(frame, out / f"{name}.parquet")
    _time_decoding(conf, valid, trained, out, seed, device)
    info = _run_info(conf, trained, seed, device, started)
    atomic_write_text(out / "run.json", json.dumps(info, indent=1, default=str))
    skipped: dict[str, str] = {}
    drawing = time.perf_counter()
    # the figures are independent: drawn by as many processes as trained the models
    workers = max(1, min(conf["train"]["workers"], os.cpu_count() or 1))
    figures = draw_all(out, skipped=skipped, workers=workers) if conf["eval"]["figures"] else []
    TIMING["figures_s"] = time.perf_counter() - drawing
    info["timing"] = dict(TIMING)
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


def _time_decoding(conf: dict[str, Any], valid: ValidConfig, trained: list[Any], out: Path,
                   seed: int, device: torch.device) -> None:
    """``decode.json``: each model's cached decode latency (``experiments.evaluate.decode``),
    measured here in the main process after every table is written; none when
    ``eval.decode_tokens`` is 0 (a stale one is removed)."""
    from experiments.evaluate.decode import DECODE_FILE, decode_rows, write_decode

    if not conf["eval"]["decode_tokens"]:
        (out / DECODE_FILE).unlink(missing_ok=True)
        return
    timing = time.perf_counter()
    write_decode(out, decode_rows(trained, valid.task, conf["eval"], seed, device))
    TIMING["decode_s"] = time.perf_counter() - timing


def _notes(conf: dict[str, Any], trained: list[Any]) -> list[str]:
    """Lines report.md states above everything: which models came from a Hugging Face checkpoint
    and whether they were trained on the task."""
    groups: dict[tuple[str, bool], list[Any]] = {}
    for t in trained:
        if t.plan.model_fields.get("arch") in ("hf", "hf_retrofit"):
            groups.setdefault((t.plan.model_fields["path"], t.plan.finetune), []).append(t)
    notes = []
    for (path, finetune), group in groups.items():
        fields = group[0].plan.model_fields
        layers = fields.get("loop_layers")
        looped = f"decoder layers [{layers[0]}, {layers[1]}) looped" if layers else \
            "natively looped"
        names = ", ".join(f"`{t.plan.run_id}`" for t in group)
        if finetune:
            notes.append(f"Fine-tuned on the task from the Hugging Face checkpoint `{path}` "
                         f"({looped}, trainable={fields.get('trainable', 'all')}): {names}.")
            continue
        skipped = [n for n in (conf["controller"]["name"], *conf["study"]["learned"])
                   if n != "fixed"]
        notes.append(f"**Not trained on the task** (model.finetune=false): {names} is the "
                     f"Hugging Face checkpoint `{path}` ({looped}) evaluated as loaded; the "
                     "training steps above do not apply to it"
                     + (f", and the learned objectives {', '.join(skipped)} were not trained"
                        if skipped else "") + ".")
    return notes


def _run_info(conf: dict[str, Any], trained: list[Any], seed: int, device: torch.device,
              started: float) -> dict[str, Any]:
    models = [{"run_id": t.plan.run_id, "arch": t.plan.arch, "objective": t.plan.objective,
               "train_loops": t.plan.loops, "status": t.status, "resumed_from": t.resumed_from,
               "final": t.history[-1] if t.history else None,
               # declared by the model (models.LoopedModel); report.md reads it, not the arch name
               "nilpotent_step": bool(t.model.nilpotent_step)} for t in trained]
    return {"config": conf, "seed": seed, "device": str(device),
            "threads": torch.get_num_threads(), "models": models, "notes": _notes(conf, trained),
            "wall_seconds": time.perf_counter() - started}
