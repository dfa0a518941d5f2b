"""The fast evaluation paths give the tables of the plain ones (issue 14): replayed controllers
versus running them, and the worker pool (train + evaluate in 2 processes) versus one process."""

from __future__ import annotations

import pandas as pd
import pytest
from _app_helpers import compose_cfg

from experiments.study import run

# smoke: two fixed models and an ouro_gate one; convergence_kl (replayed), solver (runs the model)
FAST = ["experiment=smoke", "train.steps=3", "train.checkpoint_every=0", "train.eval_every=0",
        "eval.figures=false", "+eval.controllers.res={name: convergence, criterion: residual, "
        "threshold: 0.05}"]


def _tables(out) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(out / f"{name}.parquet")
            for name in ("results", "traces", "samples")}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, pd.DataFrame]:
    out = tmp_path_factory.mktemp("plain") / "run"
    run(compose_cfg(FAST), out_dir=out)
    return _tables(out)


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


def test_replayed_controllers_give_the_tables_of_running_them(plain, tmp_path, monkeypatch):
    """Replayed controllers, and the solver started from the unroll's loop 0, against running
    every one of them with run_loop from the tokens."""
    import halting.replay
    from experiments.evaluate import measure
    from halting import run_loop

    replays, solved = [], []
    original = measure.can_replay
    monkeypatch.setattr(measure, "can_replay",
                        lambda *args: replays.append(original(*args)) or False)

    def run_it(model, ctx, states, controller, **kwargs):
        solved.append(controller.name)
        return run_loop(model, ctx.tokens, controller, **kwargs)

    monkeypatch.setattr(halting.replay, "drive_from_unroll", run_it)
    run(compose_cfg(FAST), out_dir=tmp_path / "run")
    assert replays and all(replays)  # the default run did replay these controllers
    assert solved and set(solved) == {"solver"}  # ... and start the solver from the unroll
    ran = _tables(tmp_path / "run")
    controllers = set(ran["results"]["controller"])
    assert {"convergence_kl", "res", "ouro_gate", "solver"} <= controllers
    _assert_same(plain, ran)


@pytest.mark.slow  # spawns two worker processes (each imports torch): ~20 s
def test_the_worker_pool_gives_the_tables_of_one_process(plain, tmp_path):
    run(compose_cfg([*FAST, "train.workers=2"]), out_dir=tmp_path / "run")
    _assert_same(plain, _tables(tmp_path / "run"))
