"""The loopscope Hydra app: ``loopscope`` and ``python -m experiments`` (same entry point).

``main()`` is thin: it checks the command line and the composed config up front (``preflight``:
Hydra's own errors — an unknown group option such as ``controller=pondr``, an unknown key — and
``experiments.config.validate`` for every job of a sweep) and turns any problem into one line on
stderr with exit status 2, then hands over to the ``@hydra.main`` function, which calls the plain
``run(cfg) -> dict`` (testable without Hydra: compose a config with ``hydra.compose`` and call
``run(cfg, out_dir=...)``).

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

import itertools
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import experiments.conf  # noqa: F401  (registers the code's defaults with Hydra)
from experiments.config.validate import ConfigError, ValidConfig, validate_config
from experiments.errors import FAILED_EXIT, USAGE_EXIT, LoopscopeError, fail

CONFIG_MODULE = "experiments.conf"
MAX_PREFLIGHT_JOBS = 64
PASS_THROUGH_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
                      "--shell-completion", "-sc", "--resolve", "--package", "-p")


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
    seed = job_seed(conf["seed"], _hydra_job_num())
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


def _hydra_job_num() -> int | None:
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
               "final": t.history[-1] if t.history else None} for t in trained]
    return {"config": conf, "seed": seed, "device": str(device),
            "threads": torch.get_num_threads(), "models": models,
            "wall_seconds": time.perf_counter() - started}


# -- the command line ------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    from experiments.train import TrainingFailed

    multirun = _hydra_job_num() is not None
    try:
        return run(cfg)
    except ConfigError as err:
        if multirun:
            raise
        fail("loopscope", str(err))
    except LoopscopeError as err:  # e.g. a corrupt or mismatched checkpoint in the run directory
        print(f"loopscope: error: {err}", file=sys.stderr)
        if multirun:  # keep the other jobs of the sweep going
            return {"status": "failed", "message": str(err)}
        sys.exit(USAGE_EXIT)
    except TrainingFailed as err:
        print(f"loopscope: {err}", file=sys.stderr)
        if multirun:  # keep the other jobs of the sweep going; status.json records it
            return {"status": "failed", "step": err.step, "message": str(err)}
        sys.exit(FAILED_EXIT)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``loopscope`` (and ``python -m experiments``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    error = preflight(args)
    if error:
        fail("loopscope", error)
    sys.argv = [sys.argv[0] if sys.argv else "loopscope", *args]
    _hydra_main()


def preflight(args: Sequence[str]) -> str | None:
    """Compose and validate every job the command line describes; the first problem as one line.

    Flags Hydra handles itself (``--help``, ``--cfg``, ...) skip the check.
    """
    if any(a in PASS_THROUGH_FLAGS or a.split("=")[0] in PASS_THROUGH_FLAGS for a in args):
        return None
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        return f"unknown option {flags[0]!r}; use key=value overrides, -m for a sweep, or --help"
    try:
        jobs = _expand(overrides) if multirun else [overrides]
    except Exception as err:  # hydra's override grammar errors
        return _describe(err, overrides)
    for job in jobs[:MAX_PREFLIGHT_JOBS]:
        problem = _check_job(job)
        if problem:
            return problem
    return None


def _expand(overrides: list[str]) -> list[list[str]]:
    """The override lists of every job of a sweep (cartesian product of sweep overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(combo) for combo in itertools.islice(itertools.product(*choices),
                                                      MAX_PREFLIGHT_JOBS)]


def _check_job(overrides: list[str]) -> str | None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            launcher = OmegaConf.select(cfg, "hydra.launcher._target_") or ""
            job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    except Exception as err:
        return _describe(err, overrides)
    finally:
        GlobalHydra.instance().clear()
    if "submitit" in launcher and not _importable("hydra_plugins.hydra_submitit_launcher"):
        return "the slurm launcher needs hydra-submitit-launcher: pip install 'loopscope[slurm]'"
    try:
        validate_config(job_cfg)
    except ConfigError as err:
        return str(err)
    return None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _describe(err: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra / OmegaConf error: what was wrong and the valid choices."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(err)
    if isinstance(err, OverrideParseException):
        first = text.strip().splitlines()[0] if text.strip() else "syntax error"
        return (f"cannot parse the overrides {' '.join(overrides)!r}: {first} "
                "(expected key=value, e.g. train.steps=100)")
    if isinstance(err, MissingConfigException) and getattr(err, "missing_cfg_file", None):
        missing = str(err.missing_cfg_file)
        group, _, option = missing.rpartition("/")
        if "submitit" in option:
            return ("the slurm launcher needs hydra-submitit-launcher: "
                    "pip install 'loopscope[slurm]'")
        options = list(getattr(err, "options", None) or [])
        if group:
            return (f"unknown {group} option {option!r}; choose from: "
                    f"{', '.join(sorted(options)) or '(none)'}")
    match = re.search(r"Could not override '([^']+)'", text) or re.search(
        r"Key '([^']+)' (?:is not in struct|not in)", text)
    if match:
        return _unknown_key_message(match.group(1), overrides)
    match = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if match:
        return f"{match.group(1)} already exists; override it without the leading '+'"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _unknown_key_message(key: str, overrides: list[str]) -> str:
    """Name the unknown key and list the valid keys of its parent section."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    parent, _, _ = key.rpartition(".")
    groups = [o for o in overrides if "=" in o and "." not in o.split("=")[0].lstrip("+~")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            base = compose("config", overrides=groups)
        node = OmegaConf.select(base, parent) if parent else base
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        valid = []
    finally:
        GlobalHydra.instance().clear()
    where = parent or "the config"
    listing = f"; valid keys in {where}: {', '.join(str(v) for v in valid)}" if valid else ""
    return f"unknown config key {key!r}{listing} (add a new key with +{key}=...)"


if __name__ == "__main__":
    main()
