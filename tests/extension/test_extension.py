"""Issue 15's "done when": a new architecture, controller, task or diagnostic is one new file
(its class or function, registered by a decorator) plus its YAML — nothing else is edited.

The four examples (``ext_*.py``, YAMLs under ``conf/``) live here, not in the package; importing a
module stands in for its one registration line (the import in the package's ``__init__``). The
YAMLs reach Hydra through ``hydra.searchpath``, as a user's own config directory would. Every
example is used through the public registries, and the controller and task through the Hydra app.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from _app_helpers import TINY

from experiments.cli.app import main
from experiments.evaluate import DIAGNOSTICS
from experiments.tasks import TASKS, build_task
from halting import CONTROLLERS, build_controller, run_loop
from models import ARCH_REGISTRY, build_model

HERE = Path(__file__).resolve().parent
SEARCH = f"hydra.searchpath=[file://{HERE / 'conf'}]"
FILES = {"architecture": ["ext_arch.py", "conf/model/damped_loop.yaml"],
         "controller": ["ext_controller.py", "conf/controller/small_step.yaml"],
         "task": ["ext_task.py", "conf/task/reverse.yaml"],
         "diagnostic": ["ext_diagnostic.py"]}
# module -> (registry, name): imported for this module's tests only, unregistered afterwards so
# the other tests see the shipped registries exactly
EXTENSIONS = {"ext_arch": (ARCH_REGISTRY, "damped_loop"),
              "ext_controller": (CONTROLLERS, "small_step"),
              "ext_task": (TASKS, "reverse"), "ext_diagnostic": (DIAGNOSTICS, "state_rms")}


@pytest.fixture(scope="module", autouse=True)
def extensions():
    """Import the four examples (their decorators register them); undo it afterwards."""
    modules = {name: importlib.import_module(name) for name in EXTENSIONS}
    yield modules
    for name, (registry, key) in EXTENSIONS.items():
        registry.unregister(key)
        sys.modules.pop(name, None)


class _NoExit:
    """Fail with the app's exit status if it exits (a config error) instead of finishing."""

    def __enter__(self) -> _NoExit:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if kind is SystemExit:
            pytest.fail(f"loopscope exited with {err.code}")
        return False


def _app(tmp_path: Path, *overrides: str) -> Path:
    """Run ``loopscope`` in-process on the tiny config; return the finished run directory."""
    out = tmp_path / "run"
    with _NoExit():
        main([*TINY, SEARCH, *overrides, f"out_dir={out}", f"hydra.run.dir={tmp_path}/hydra"])
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    return out


@pytest.fixture(scope="module")
def app_run(tmp_path_factory) -> pd.DataFrame:
    """One tiny app run using the example task, controller and (registered) diagnostic."""
    out = _app(tmp_path_factory.mktemp("ext"), "task=reverse", "model.window=4",
               "+controller@eval.controllers.small=small_step")
    return pd.read_parquet(out / "results.parquet")


def test_each_extension_is_one_file_plus_its_yaml():
    here = Path(__file__).resolve().parent
    for kind, files in FILES.items():
        assert all((here / f).is_file() for f in files), kind
        assert len(files) <= 2, kind


def test_architecture_builds_and_loops_through_the_registry():
    assert "damped_loop" in ARCH_REGISTRY
    torch.manual_seed(0)
    model = build_model("damped_loop", vocab_size=8, max_seq_len=6, d_model=16, n_heads=2,
                        n_layers=1)
    tokens = torch.randint(0, 8, (3, 6))
    out = run_loop(model, tokens, "fixed", max_loops=3, record=True)
    assert out.logits.shape == (3, 6, 8)
    # damping: each recorded step moves the state halfway to the serial loop's update
    ctx = model.prepare(tokens)
    z1 = 0.5 * out.states[0] + 0.5 * super(type(model), model).step(out.states[0], ctx, 0)
    assert torch.allclose(out.states[1], z1, atol=1e-6)


@pytest.mark.slow
def test_architecture_runs_in_the_app(tmp_path):
    out = _app(tmp_path, "model=damped_loop")
    results = pd.read_parquet(out / "results.parquet")
    assert set(results["arch"]) == {"damped_loop"}


def test_controller_through_the_registry_and_the_app(app_run):
    assert isinstance(build_controller({"name": "small_step", "threshold": 0.1}),
                      CONTROLLERS.get("small_step"))
    rows = app_run[(app_run["controller"] == "small") & (app_run["metric"] == "mean_loops")]
    assert len(rows) > 0 and rows["value"].between(1, rows["budget"].max()).all()


def test_task_through_the_registry_and_the_app(app_run):
    task = build_task("reverse", max_len=3)
    assert isinstance(task, TASKS.get("reverse"))
    batch = task.batch("val", 8, torch.Generator().manual_seed(0))
    eq = (batch.tokens == task.EQ).nonzero()[0]  # the first row's "=": its answer follows
    row, m = int(eq[0]), int(eq[1])
    answer = batch.targets[row, m + 1: 2 * m + 1]
    assert torch.equal(answer, batch.tokens[row, :m].flip(0))
    assert set(app_run["task"]) == {"reverse"}
    assert (app_run["metric"] == "accuracy").any()


def test_diagnostic_lands_in_the_results_table(app_run):
    assert "state_rms" in DIAGNOSTICS
    rows = app_run[(app_run["metric"] == "state_rms") & (app_run["split"] == "val")]
    loops = int(rows["budget"].max())
    assert sorted(rows["loop"]) == list(range(1, loops + 1))
    assert (rows["value"] > 0).all()
