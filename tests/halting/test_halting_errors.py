"""Bad input gets one clear error naming the bad value and what is allowed."""

import pytest
import torch
from _tiny import SMALL

from halting import build_controller, run_loop


def test_unknown_controller_lists_known_names():
    with pytest.raises(KeyError, match="unknown controller 'pondernett'.*act.*pondernet.*q_halt"):
        build_controller("pondernett")
    with pytest.raises(KeyError, match="needs a 'name'"):
        build_controller({"beta": 0.1})


def test_unknown_parameter_names_the_controller():
    with pytest.raises(TypeError, match="controller 'act'.*lambda_prior"):
        build_controller("act", lambda_prior=0.2)


def test_mapping_config_with_params():
    controller = build_controller({"name": "pondernet", "lambda_prior": 0.3, "beta": 0.02})
    assert controller.lambda_prior == 0.3 and controller.beta == 0.02


@pytest.mark.parametrize("name,params,match", [
    ("convergence", {"threshold": -1.0}, r"threshold must be in \(0.0, inf\), got -1.0"),
    ("convergence", {"criterion": "kl", "patience": 0}, "patience"),
    ("convergence", {"check_every": 0}, "check_every"),
    ("convergence", {"reduce": "median"}, "reduce must be one of"),
    ("pondernet", {"lambda_prior": 1.5}, r"lambda_prior must be in \(0.0, 1.0\), got 1.5"),
    ("pondernet", {"lambda_prior": 0.0}, "lambda_prior"),
    ("pondernet", {"inference": "argmax"}, "inference must be one of"),
    ("pondernet", {"beta": -0.1}, "beta"),
    ("ouro_gate", {"q": 1.5}, r"q must be in \(0.0, 1.0\], got 1.5"),
    ("act", {"eps": 1.0}, r"eps must be in \[0.0, 1.0\), got 1.0"),
    ("act", {"tau": float("nan")}, "tau must be a finite number"),
    ("q_halt", {"explore": 2.0}, r"explore must be in \[0.0, 1.0\], got 2.0"),
    ("q_halt", {"mode": "act"}, "mode must be one of"),
    ("solver", {"tol": 0.0}, "tol"),
    ("solver", {"backward": "exact"}, "backward must be one of"),
    ("fixed", {"loops": 0}, "loops must be"),
])
def test_parameters_out_of_range(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_controller(name, **params)


def test_unknown_criterion_lists_known():
    with pytest.raises(KeyError, match="unknown convergence criterion 'l2'.*acceleration"):
        build_controller("convergence", criterion="l2")


def test_loop_bounds_and_options():
    model, tokens = SMALL.model("toy"), SMALL.tokens()
    with pytest.raises(ValueError, match="max_loops=2 < min_loops=3"):
        run_loop(model, tokens, "fixed", max_loops=2, min_loops=3)
    with pytest.raises(ValueError, match="max_loops must be an integer >= 1, got 0"):
        run_loop(model, tokens, "fixed", max_loops=0)
    with pytest.raises(ValueError, match="loops=5 exceeds max_loops=3"):
        run_loop(model, tokens, build_controller("fixed", loops=5), max_loops=3)
    with pytest.raises(ValueError, match="granularity must be one of"):
        run_loop(model, tokens, "fixed", max_loops=2, granularity="batch")
    with pytest.raises(ValueError, match="token_policy must be one of"):
        run_loop(model, tokens, "fixed", max_loops=2, token_policy="dropped")
    with pytest.raises(ValueError, match="grad_steps"):
        run_loop(model, tokens, "fixed", max_loops=2, grad_steps=0)
    with pytest.raises(TypeError, match="tokens must be a"):
        run_loop(model, tokens.float(), "fixed", max_loops=2)


@pytest.mark.parametrize("name", ["q_halt", "solver"])
def test_token_granularity_on_sample_only_controller(name):
    with pytest.raises(ValueError, match=f"controller '{name}' supports granularity"):
        run_loop(SMALL.model("toy"), SMALL.tokens(), name, max_loops=3, granularity="token")


def test_halt_token_needs_a_halt_token():
    with pytest.raises(ValueError, match="has no halt token"):
        run_loop(SMALL.model("toy"), SMALL.tokens(), "halt_token", max_loops=3)
    with pytest.raises(ValueError, match="token_id=20 is outside the vocabulary"):
        run_loop(SMALL.model("toy"), SMALL.tokens(), build_controller("halt_token", token_id=20),
                 max_loops=3)


def test_targets_shape_checked():
    out = run_loop(SMALL.model("toy"), SMALL.tokens(), "fixed", max_loops=2)
    controller = build_controller("fixed")
    with pytest.raises(ValueError, match="targets shape"):
        controller.loss_terms(out, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        controller.loss_terms(out, torch.zeros(4, 8))
