"""Each controller's defaults live in one place (its class signature): the YAMLs hold only
``name`` and documented overrides; criteria refuse thresholds outside their value's range."""

from pathlib import Path

import pytest
import yaml
from _app_helpers import ROOT, compose_cfg
from omegaconf import OmegaConf

from halting import CONTROLLERS, build_controller, controller_defaults

CONTROLLER_DIR = ROOT / "experiments" / "conf" / "controller"


def _overrides(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    return {k: v for k, v in data.items() if k not in ("defaults", "name")}


@pytest.mark.parametrize("name", CONTROLLERS.names())
def test_controller_yaml_only_overrides_the_class_defaults(name):
    path = CONTROLLER_DIR / f"{name}.yaml"
    defaults = controller_defaults(name)
    text = path.read_text().splitlines()
    for key, value in _overrides(path).items():
        assert key in defaults and value != defaults[key], (name, key)  # no restated default
        line = next(i for i, line in enumerate(text) if line.startswith(f"{key}:"))
        assert text[line - 1].startswith("#") or "#" in text[line], (name, key)  # says why
    composed = OmegaConf.to_container(compose_cfg([f"controller={name}"]).controller)
    assert composed == {**defaults, **_overrides(path)}


def test_pondernet_config_samples_as_the_class_and_the_paper_do():
    composed = compose_cfg(["controller=pondernet"]).controller
    assert composed.inference == "sample" == controller_defaults("pondernet")["inference"]
    assert compose_cfg(["controller=pondernet", "controller.beta=0.3"]).controller.beta == 0.3


def test_halting_comparison_argmax_is_a_patience_not_a_disguised_fixed_exit():
    cfg = compose_cfg(["experiment=halting_comparison"])
    for section in cfg.eval.controllers.values():
        build_controller(dict(section))  # every criterion's threshold within its range
    argmax = build_controller(dict(cfg.eval.controllers.convergence_argmax))
    assert argmax.criterion == "argmax" and argmax.patience == 5 and argmax.threshold <= 1


@pytest.mark.parametrize("criterion,threshold", [("argmax", 5), ("argmax", 1.5),
                                                 ("cosine", 3.0)])
def test_threshold_outside_the_criterion_range_is_refused(criterion, threshold):
    with pytest.raises(ValueError, match=rf"threshold={threshold!r} can never fail for "
                                         rf"criterion '{criterion}'.*\(0, "):
        build_controller("convergence", criterion=criterion, threshold=threshold)
    build_controller("convergence", criterion=criterion, threshold=0.5)  # in range: accepted
