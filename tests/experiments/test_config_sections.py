"""Typed settings are the one source of defaults; YAML only overrides; checks follow the fields."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from experiments.config import sections
from experiments.config.store import task_defaults
from experiments.config.validate import ConfigError, rules_of, validate_config
from experiments.tasks import TASKS

CONF = Path(__file__).resolve().parents[2] / "experiments" / "conf"


def _compose(overrides: list[str]) -> dict:
    with initialize_config_module("experiments.conf", version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides))


def test_every_setting_has_a_docstring_and_a_check():
    tree = ast.parse(inspect.getsource(sections))
    for cls in (sections.RunConfig, *sections.SECTIONS.values()):
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        documented = {
            stmt.target.id for stmt, after in zip(node.body, node.body[1:])
            if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
        }
        names = {f.name for f in dataclasses.fields(cls)}
        assert documented == names, (cls.__name__, names - documented)
        assert all("check" in f.metadata for f in dataclasses.fields(cls))


def test_config_yaml_restates_no_default():
    primary = yaml.safe_load((CONF / "config.yaml").read_text())
    assert not {"seed", "out_dir", "threads", "train", "eval", "study"} & set(primary)


def test_composed_defaults_are_the_dataclass_defaults():
    cfg = _compose(["study.name=x"])  # the default experiment overrides some; compare the rest
    for name, cls in sections.SECTIONS.items():
        untouched = {"train": ["lr", "beta2", "grad_clip", "device"],
                     "eval": ["unroll", "verdict_loops", "spectral_iters"],
                     "study": []}[name]
        for key in untouched:
            assert cfg[name][key] == getattr(cls(), key)
    assert cfg["seed"] == sections.RunConfig().seed


@pytest.mark.parametrize("name", list(TASKS))
def test_task_yaml_starts_from_the_task_defaults(name):
    text = yaml.safe_load((CONF / "task" / f"{name}.yaml").read_text())
    assert text["defaults"][0] == f"/schema/task/{name}@_here_"
    restated = {k: v for k, v in text.items()
                if k not in ("defaults", "name") and task_defaults(name).get(k) == v}
    assert not restated, f"task/{name}.yaml restates defaults {restated}"


def test_task_parameter_not_in_yaml_can_be_overridden():
    cfg = _compose(["experiment=smoke", "task.min_len=3"])  # min_len is not in parity.yaml
    assert validate_config(cfg).task.train_range == (3, 6)


def test_derived_rules_name_the_range():
    rules = rules_of(sections.TrainConfig)
    assert rules["lr"].allowed == "a number in (0, inf)"
    assert rules["grad_steps"].allowed == "null or an integer >= 1" and rules["grad_steps"].nullable
    assert rules_of(sections.EvalConfig)["splits"].allowed == "a non-empty list of train, val, hard"
    cfg = _compose(["experiment=smoke", "train.beta1=1.0"])
    with pytest.raises(ConfigError, match=r"train.beta1=1.0 is invalid; expected a number in "
                                          r"\[0, 1\)"):
        validate_config(cfg)


def test_unknown_section_key_names_it_and_the_valid_ones():
    cfg = _compose(["experiment=smoke"])
    cfg["eval"]["unrol"] = 3
    with pytest.raises(ConfigError) as raised:
        validate_config(cfg)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("unknown config key eval.unrol; valid keys in eval: ")
    assert "unroll" in message and "verdict_loops" in message


def test_valid_config_carries_typed_sections():
    valid = validate_config(_compose(["experiment=smoke"]))
    assert isinstance(valid.train, sections.TrainConfig) and valid.train.steps == 6
    assert valid.evaluation.budgets == [3] and valid.study.train_loops == [1, 2]
