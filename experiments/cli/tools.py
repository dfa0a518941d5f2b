"""Small command-line tools around saved runs: ``loopscope-plot`` and ``loopscope-diagnose``.

``loopscope-plot RUN_DIR`` redraws every figure from the run's saved tables
(``experiments.figures.draw_all``) and regenerates ``report.md`` — nothing is recomputed.

``loopscope-diagnose CHECKPOINT [--loops K] [--batch B] [--task NAME] [--split S] [--seed N]``
loads a trained model (``models.load_model``; a local Hugging Face checkpoint directory goes
through ``models.hf.from_pretrained`` with ``--loop-layers A B`` and ``--injection``), finds its
task in the ``train.json`` beside it (or the run's ``run.json``; ``--task`` overrides with that
task's defaults), unrolls it for K loops on fresh task data (default: 4x its training depth, at
least 32) and prints the share of each trajectory verdict (``fixedpoint.classify`` with the
model's step map, so aperiodic trajectories split into chaotic / quasi-periodic; periodic ones by
period) with the median spectral radius at the final state and the median contraction rate per
verdict.

Both print one clear line and exit with status 2 on a bad path, a directory that is not a run, or a
corrupt checkpoint.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.errors import fail, one_line


# -- loopscope-plot --------------------------------------------------------------------------------
def plot_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``loopscope-plot RUN_DIR``."""
    prog = "loopscope-plot"
    parser = argparse.ArgumentParser(prog=prog, description="Redraw a run's figures and report "
                                     "from its saved results (no recomputation).")
    parser.add_argument("run_dir", help="a loopscope run directory (holds results.parquet)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        fail(prog, f"{str(run_dir)!r} is not a directory")
    from experiments.figures import draw_all
    from experiments.results.report import write_report

    skipped: dict[str, str] = {}
    try:
        check_run(run_dir)  # before anything is written: a bad run leaves its figures as they are
        written = draw_all(run_dir, skipped=skipped)
        report = write_report(run_dir)
    except (ValueError, OSError) as err:
        fail(prog, f"{str(run_dir)!r} is not a readable loopscope run: {one_line(err)}")
    for path in written:
        print(path)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    print(report)


def check_run(run_dir: Path) -> None:
    """``ValueError`` unless the run's tables are loopscope tables with data and its report can
    be built (``experiments.figures.check_tables``)."""
    from experiments.figures import check_tables
    from experiments.results import load_run
    from experiments.results.report import _read_info, build_report

    tables = load_run(run_dir)
    check_tables(tables)
    try:
        build_report(tables["results"], tables.get("samples"), _read_info(run_dir), run_dir)
    except (KeyError, IndexError, TypeError) as err:  # values a loopscope run never writes
        raise ValueError(f"its report cannot be built: {type(err).__name__}: {err}") from None


# -- loopscope-diagnose ----------------------------------------------------------------------------
def diagnose_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``loopscope-diagnose CHECKPOINT``."""
    prog = "loopscope-diagnose"
    parser = argparse.ArgumentParser(prog=prog, description="Unroll a trained looped model past "
                                     "its training depth and print the trajectory verdicts.")
    parser.add_argument("checkpoint", help="a model .safetensors file written by loopscope, or "
                        "a local Hugging Face checkpoint directory (needs --task)")
    parser.add_argument("--loops", type=int, default=None, help="unrolled loops K (default: "
                        "4x the training depth, at least 32)")
    parser.add_argument("--batch", type=int, default=64, help="samples (default 64)")
    parser.add_argument("--task", default=None, help="task name (default: the checkpoint's own)")
    parser.add_argument("--split", default="val", choices=("train", "val", "hard"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop-layers", type=int, nargs=2, default=None, metavar=("A", "B"),
                        help="Hugging Face checkpoint directory: loop decoder layers [A, B)")
    parser.add_argument("--injection", default=None, choices=("none", "add", "concat"),
                        help="Hugging Face checkpoint directory: input injection (default none)")
    args = parser.parse_args(argv)
    if args.loops is not None and args.loops < 8:
        fail(prog, f"--loops must be >= 8 to classify a trajectory, got {args.loops}")
    if args.batch < 1:
        fail(prog, f"--batch must be >= 1, got {args.batch}")
    if Path(args.checkpoint).is_dir() and Path(args.checkpoint).suffix != ".safetensors":
        model, meta = _load_hf(prog, Path(args.checkpoint), args.loop_layers, args.injection)
    else:
        model, meta = _load(prog, Path(args.checkpoint))
    task = _task(prog, args.task, meta, model)
    loops = args.loops or max(32, 4 * int(meta.get("loops", 8)))
    table, summary = diagnose(model, task, loops=loops, batch=args.batch, split=args.split,
                              seed=args.seed)
    print(summary)
    print(table)


def _load(prog: str, path: Path) -> tuple[Any, dict[str, Any]]:
    from models import load_model

    if not path.exists():
        fail(prog, f"checkpoint {str(path)!r} does not exist (expected a model .safetensors)")
    if not path.is_file():
        fail(prog, f"checkpoint {str(path)!r} is not a file (expected a model .safetensors)")
    try:
        model = load_model(path, map_location="cpu")
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        fail(prog, f"cannot load checkpoint {str(path)!r}: {one_line(err)}")
    return model.eval(), _plan_beside(path)


def _load_hf(prog: str, path: Path, loop_layers: Any, injection: str | None
             ) -> tuple[Any, dict[str, Any]]:
    """A local Hugging Face checkpoint directory through ``models.hf`` (no training plan)."""
    try:
        from models.hf import from_pretrained

        model = from_pretrained(path, loop_layers=loop_layers, injection=injection)
    except (ImportError, ValueError, OSError) as err:
        fail(prog, f"cannot load {str(path)!r}: {one_line(err)}")
    return model, {"loops": getattr(model, "configured_loops", 8)}


def _plan_beside(path: Path) -> dict[str, Any]:
    """The training plan saved next to a checkpoint (train.json) or in its run's run.json."""
    train_json = path.parent / "train.json"
    if train_json.is_file():
        try:
            return json.loads(train_json.read_text())["plan"]
        except (ValueError, KeyError):
            pass
    for parent in list(path.parents)[:4]:
        run_json = parent / "run.json"
        if run_json.is_file():
            try:
                return {"task_cfg": json.loads(run_json.read_text())["config"]["task"]}
            except (ValueError, KeyError):
                pass
    return {}


def _task(prog: str, name: str | None, meta: dict[str, Any], model: Any) -> Any:
    from experiments.tasks import build_task

    if name is None and not meta.get("task_cfg"):
        fail(prog, "no train.json or run.json beside the checkpoint says which task it was "
              "trained on; pass --task NAME")
    cfg = {"name": name} if name else dict(meta["task_cfg"])
    try:
        task = build_task(cfg.pop("name"), **cfg)
    except (KeyError, ValueError, TypeError) as err:
        fail(prog, f"task: {one_line(err)}")
    max_len = model.config.max_seq_len  # a saved checkpoint: always a built architecture
    if task.vocab_size > model.vocab_size or task.seq_len > max_len:
        fail(prog, f"task {task.name!r} (vocab {task.vocab_size}, length {task.seq_len}) does "
              f"not fit the model (vocab {model.vocab_size}, max length {max_len})")
    return task


@torch.no_grad()
def _unroll(model: Any, tokens: torch.Tensor, loops: int) -> tuple[torch.Tensor, Any]:
    ctx = model.prepare(tokens)
    z = model.init_state(ctx)
    states = [z]
    for k in range(loops):
        z = model.step(z, ctx, k)
        states.append(z)
    return torch.stack(states), ctx  # (K+1, B, T, D)


def diagnose(model: Any, task: Any, *, loops: int, batch: int, split: str = "val",
             seed: int = 0) -> tuple[str, str]:
    """Unroll ``model`` for ``loops`` steps on a fresh ``task`` batch; return (table, summary).

    The table has one row per verdict (periodic rows per period): count, share, median spectral
    radius of the step map at the final state, median contraction rate.
    """
    from fixedpoint import classify

    torch.manual_seed(seed)
    data = task.batch(split, batch, torch.Generator().manual_seed(seed))
    states, ctx = _unroll(model, data.tokens, loops)

    def step_map(z: torch.Tensor, sub: Any) -> torch.Tensor:
        return model.step(z, sub, loops)

    with torch.enable_grad():
        verdicts = classify(states.float(), f=step_map, inputs=(ctx,), spectral_iters=20,
                            lyapunov_steps=32)
    correct_last = task.score(model.readout(states[-1], ctx).float(), data)["correct"]
    summary = (f"unrolled {loops} loops on {batch} {task.name} samples ({split}); "
               f"accuracy after {loops} loops {correct_last.float().mean():.3f}")
    return _verdict_table(verdicts), summary


def _verdict_table(verdicts: Any) -> str:
    labels = np.asarray(verdicts.label)
    periods = verdicts.period.cpu().numpy()
    radius = verdicts.spectral_radius.float().cpu().numpy()
    rate = verdicts.rate.float().cpu().numpy()
    names = np.array([f"{lab} (period {p})" if lab == "periodic" else lab
                      for lab, p in zip(labels, periods)])
    lines = [f"{'verdict':<22} {'count':>6} {'share':>7} {'median rho':>11} {'median rate':>12}",
             "-" * 62]
    for name in sorted(set(names), key=lambda n: -(names == n).sum()):
        mask = names == name
        lines.append(f"{name:<22} {int(mask.sum()):>6} {mask.mean():>7.1%} "
                     f"{_median(radius[mask]):>11} {_median(rate[mask]):>12}")
    return "\n".join(lines)


def _median(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    return f"{np.median(finite):.4f}" if finite.size else "—"
