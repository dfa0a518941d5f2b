"""Every config of every group composes and validates; bad configs give one clear line, exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from experiments.cli.preflight import preflight
from experiments.config.validate import ConfigError, validate_config
from experiments.study import plan_models

CONF = Path(__file__).resolve().parents[2] / "experiments" / "conf"
ROOT = CONF.parents[1]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def trained_options(group: str) -> list[str]:
    """The options a study trains (model=hf_retrofit loads a checkpoint; see test_hf_loading)."""
    return [o for o in options(group) if not (group == "model" and o == "hf_retrofit")]


def compose_cfg(overrides: list[str], hydra_cfg: bool = False):
    with initialize_config_module("experiments.conf", version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


def test_every_group_has_its_options():
    assert options("model") == ["deq", "hf_retrofit", "parallel_loop", "recurrent_depth",
                                "serial_loop"]
    assert options("controller") == ["act", "convergence", "fixed", "halt_token", "ouro_gate",
                                     "pondernet", "q_halt", "solver"]
    assert options("task") == ["addition", "parity", "parity_vector", "phop", "pycode", "s5"]
    assert options("experiment") == ["convergence_study", "decode", "default", "halting_comparison",
                                     "loopcoder", "parity_halting", "smoke"]
    assert {"local", "slurm"} <= set(options("hydra/launcher"))


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "controller", "task")
                                          for o in trained_options(g)])
def test_group_option_composes_and_validates(group, option):
    overrides = ["experiment=smoke", f"{group}={option}"]
    if group == "task" and option == "pycode":
        overrides += ["task.seq_len=16"]
    if group == "controller" and option == "fixed":
        overrides.append("controller.loops=2")
    cfg = compose_cfg(overrides)
    assert cfg[group]["name" if group != "model" else "arch"] == option
    valid = validate_config(cfg)
    assert valid.models and valid.task.vocab_size >= 2
    assert plan_models(valid.cfg, valid)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_composes_validates_and_plans(experiment):
    overrides = [f"experiment={experiment}"]
    cfg = compose_cfg(overrides)
    assert cfg.study.name == experiment
    valid = validate_config(cfg)
    plans = plan_models(valid.cfg, valid)
    if experiment == "default":  # loop counts 1..4 plus one learned-halting model
        assert [(p.objective, p.loops) for p in plans] == [
            ("fixed", 1), ("fixed", 2), ("fixed", 3), ("fixed", 4), ("ouro_gate", 4)]
    if experiment == "parity_halting":  # fixed 1..4 and three learned controllers at cap 4
        assert [(p.objective, p.loops) for p in plans] == [
            ("fixed", 1), ("fixed", 2), ("fixed", 3), ("fixed", 4), ("act", 4),
            ("pondernet", 4), ("ouro_gate", 4)]
    if experiment == "convergence_study":
        assert sorted(p.arch for p in plans) == sorted(trained_options("model"))
    assert len({p.run_id for p in plans}) == len(plans)


def test_local_launcher_is_joblib():
    cfg = compose_cfg(["hydra/launcher=local"], hydra_cfg=True)
    assert "Joblib" in cfg.hydra.launcher._target_
    assert cfg.hydra.launcher.n_jobs == 2


def test_default_config_is_the_default_study():
    cfg = compose_cfg([])
    assert cfg.study.name == "default"
    assert list(cfg.study.train_loops) == [1, 2, 3, 4]
    assert OmegaConf.select(cfg, "eval.controllers.solver.name") == "solver"


BAD = [
    (["controller=pondr"], r"unknown controller option 'pondr'; choose from: act, convergence"),
    (["task=nope"], r"unknown task option 'nope'; choose from: addition"),
    (["train.stepz=3"], r"unknown config key 'train.stepz'; valid keys in train: .*steps"),
    (["+train.stepz=3"], r"unknown config key train.stepz; valid keys in train"),
    (["+model.foo=1"], r"model: .*foo"),
    (["train.steps=0"], r"train.steps=0 is invalid; expected an integer >= 1"),
    (["train.lr=abc"], r"train.lr='abc' is invalid; expected a number"),
    (["study.train_loops=[0,2]"], r"study.train_loops=\[0, 2\] is invalid"),
    (["study.train_loops=[]", "controller.loops=0"], r"controller.loops=0 is invalid"),
    (["eval.controllers.convergence_kl.threshold=-1"], r"eval.controllers.convergence_kl: .*"
                                                       r"threshold"),
    (["controller=ouro_gate", "controller.q=1.5"], r"controller: .*q"),
    (["model.window=100"], r"model.window=100 exceeds the task's sequence length"),
    (["eval.controllers.convergence_kl.min_loops=6"], r"max_loops 4 < min_loops 6"),
    (["controller=halt_token", "+model.halt_token_id=null"], r"needs a halt token"),
    (["eval.granularity=token"], r"eval.granularity=token is not supported by "
                                 r"eval.controllers.solver \(solver\); it supports: sample"),
    (["eval.splits=[test]"], r"eval.splits=\['test'\] is invalid"),
    (["+model.vocab_size=9"], r"model.vocab_size is set from the task"),
    (["eval.decode_tokens=-1"], r"eval.decode_tokens=-1 is invalid; expected an integer >= 0"),
    (["eval.decode_tokens=true"], r"eval.decode_tokens=True is invalid; expected an integer"),
    (["eval.decode_batch=0"], r"eval.decode_batch=0 is invalid; expected an integer >= 1"),
    (["eval.decode_batch=2.5"], r"eval.decode_batch=2.5 is invalid; expected an integer >= 1"),
    (["-x"], r"unknown option '-x'"),
    (["train.steps=[1"], r"cannot parse the overrides 'train.steps=\[1'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_gives_one_clear_line(overrides, message):
    problem = preflight(overrides)
    assert problem is not None
    assert "\n" not in problem
    assert re.search(message, problem), problem


def test_sweep_is_checked_job_by_job():
    assert preflight(["-m", "experiment=smoke", "seed=0,1"]) is None
    problem = preflight(["-m", "experiment=smoke", "train.steps=5,0"])
    assert problem and "train.steps=0" in problem


def test_validate_rejects_unknown_top_level_key():
    cfg = OmegaConf.to_container(compose_cfg(["experiment=smoke"]))
    cfg["colour"] = "red"
    with pytest.raises(ConfigError, match="unknown config key colour"):
        validate_config(cfg)


def test_main_exits_2_with_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "experiments", "controller=pondr"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "pondr" in lines[0] and "pondernet" in lines[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA present")
def test_cuda_device_without_cuda_is_a_config_error():
    problem = preflight(["experiment=smoke", "train.device=cuda"])
    assert problem and "train.device=cuda" in problem and "auto or cpu" in problem


def test_slurm_launcher_without_its_plugin_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        pytest.skip("hydra-submitit-launcher is installed")
    problem = preflight(["-m", "hydra/launcher=slurm", "seed=0,1"])
    assert problem and "pip install 'loopscope[slurm]'" in problem
