"""Mode traps (issue 11): the run's mode is the model's unless run_loop is told otherwise, every
controller works at max_loops=1."""

import warnings

import pytest
import torch
from _tiny import SMALL

from halting import CONTROLLERS, build_controller, run_loop

SEQ = SMALL.seq
VOCAB = SMALL.vocab_size

HALT_ID = VOCAB - 1
EARLY = ("act", "pondernet", "ouro_gate", "halt_token", "q_halt")


def _early_exit_model():
    """A toy whose halting signals fire early for some rows (so early exits exist)."""
    model = SMALL.model("toy", halt_token_id=HALT_ID)
    torch.nn.init.normal_(model.halt.weight, std=0.5)
    with torch.no_grad():
        model.halt.bias.fill_(0.0)
        model.head.bias[HALT_ID] = 2.0
    return model


def _built(name, model):
    controller = build_controller(name, **({"explore": 1.0} if name == "q_halt" else {}))
    controller.bind(model)
    if name == "q_halt":
        with torch.no_grad():
            controller.head.bias.copy_(torch.tensor([1.0, 0.0]))  # halts at once in eval
    return controller


@pytest.mark.parametrize("name", EARLY)
def test_readme_usage_under_model_eval_exits_early(name):
    """model.eval() + a fresh build_controller(...): no row runs past its reported exit."""
    model = _early_exit_model().eval()
    controller = _built(name, model)
    assert controller.training  # build_controller returns a training-mode module
    tokens = SMALL.tokens(batch=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh controller follows the model silently
        with torch.no_grad():
            out = run_loop(model, tokens, controller, max_loops=6)
    assert not out.training and not controller.training
    assert out.executed == int(out.depth.sum())
    assert int(out.depth.min()) < 6  # early exits exist, so the equality above can fail
    if name == "q_halt":  # no exploration in evaluation: deterministic, halts at once
        with torch.no_grad():
            again = run_loop(model, tokens, controller, max_loops=6)
        assert torch.equal(out.depth, again.depth) and (out.depth == 1).all()


@pytest.mark.parametrize("name", ["pondernet", "ouro_gate", "q_halt"])
def test_model_train_runs_the_controller_in_training_mode(name):
    model = _early_exit_model().train()
    controller = _built(name, model)
    out = run_loop(model, SMALL.tokens(), controller, max_loops=5)
    assert out.training and out.executed == 4 * 5  # every row runs to the cap for its loss
    forced = run_loop(model, SMALL.tokens(), controller, max_loops=5, mode="eval")
    assert not forced.training and forced.executed == int(forced.depth.sum()) < 4 * 5


def test_hand_set_controller_mode_against_the_model_warns_and_follows_the_model():
    model = _early_exit_model().eval()
    controller = build_controller("ouro_gate").train()
    with pytest.warns(UserWarning, match="set to train mode but the model is in eval mode"):
        with torch.no_grad():
            out = run_loop(model, SMALL.tokens(), controller, max_loops=5)
    assert not out.training and out.executed == int(out.depth.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit run mode is no mismatch
        assert run_loop(model, SMALL.tokens(), controller, max_loops=5, mode="train").training
    with pytest.raises(ValueError, match=r"mode must be one of \('auto', 'train', 'eval'\)"):
        run_loop(model, SMALL.tokens(), controller, max_loops=5, mode="inference")


SETTINGS = {"convergence": {"criterion": "kl"}, "solver": {"tol": 1e-2}}


@pytest.mark.parametrize("name", CONTROLLERS.names())
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_controller_works_at_max_loops_1(name, mode):
    model = SMALL.model("deq" if name == "solver" else "toy", halt_token_id=HALT_ID)
    model.train(mode == "train")
    targets = torch.randint(0, VOCAB - 1, (4, SEQ), generator=torch.Generator().manual_seed(2))
    controller = build_controller(name, **SETTINGS.get(name, {}))
    controller.bind(model)
    for granularity in controller.granularities:
        out = run_loop(model, SMALL.tokens(), controller, max_loops=1, granularity=granularity,
                       targets=targets)
        assert out.training == (mode == "train")
        assert (out.depth == 1).all() and out.logits.shape == (4, SEQ, VOCAB)
        per_unit = SEQ if granularity == "token" else 1
        assert out.executed == 4 * per_unit
        assert torch.isfinite(sum(out.loss_terms.values()))


@pytest.mark.parametrize("name", ["pondernet", "ouro_gate", "halt_token", "q_halt"])
def test_training_on_an_eval_mode_run_is_refused(name):
    """An eval-mode loss has no halting objective: computing it is fine, training on it fails."""
    model = _early_exit_model().train()
    controller = _built(name, model)
    targets = torch.randint(0, VOCAB - 1, (4, SEQ), generator=torch.Generator().manual_seed(2))
    out = run_loop(model, SMALL.tokens(), controller, max_loops=4, targets=targets, mode="eval")
    assert set(out.loss_terms) == {"task"} and torch.isfinite(out.loss_terms["task"])
    with pytest.raises(RuntimeError, match=f"{name}: backward through the loss of an "
                                           "evaluation-mode run"):
        sum(out.loss_terms.values()).backward()
    trained = run_loop(model, SMALL.tokens(), controller, max_loops=4, targets=targets)
    assert trained.training and len(trained.loss_terms) > 1
    sum(trained.loss_terms.values()).backward()  # training mode: the full objective trains
