"""Helpers shared by the app's tests (experiments/ and robustness/): compose a config, and the
overrides of the smallest run that still trains, checkpoints and evaluates.

A module of its own (not conftest) so that test directories never fight over the name; pytest
puts ``tests/`` on ``sys.path`` because ``tests/conftest.py`` lives there.
"""

from pathlib import Path

from hydra import compose, initialize_config_module

ROOT = Path(__file__).resolve().parents[1]

# one tiny fixed-loop model, evaluation kept minimal: the training path is what is tested
TINY = ["experiment=smoke", "study.train_loops=[2]", "~study.learned.ouro_gate",
        "~eval.controllers.solver", "eval.figures=false", "eval.attention_samples=0",
        "train.steps=8", "train.checkpoint_every=3", "train.eval_every=4"]


def compose_cfg(overrides: list[str]):
    """The composed config for ``overrides``, as ``loopscope`` would build it (no Hydra run)."""
    with initialize_config_module("experiments.conf", version_base="1.3"):
        return compose("config", overrides=overrides)
