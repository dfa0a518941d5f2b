"""Every controller x every architecture in train and eval mode, and each controller's own rule:
convergence criteria values and patience, PonderNet/Ouro/halt-token exits, ACT's mixture, Q-halt's
initial behaviour and exploration, the solver's accounting, gradients into every halting head."""

import math
import warnings

import pytest
import torch
from _tiny import SMALL

from halting import CONTROLLERS, CRITERIA, RunState, StepView, build_controller, run_loop
from halting.objectives import act_weights, cdf_exit, geometric_halting
from models import ARCHS

SEQ = SMALL.seq
VOCAB = SMALL.vocab_size
ALL_ARCHS = ("toy", *ARCHS)

HALT_ID = VOCAB - 1
SETTINGS = {
    "fixed": {"loops": 3},
    "convergence": {"criterion": "kl", "threshold": 0.05},
    "solver": {"solver": "anderson", "tol": 1e-2},
    "act": {},
    "pondernet": {},
    "ouro_gate": {},
    "halt_token": {},
    "q_halt": {},
}


def _targets(batch=4, seed=2):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, VOCAB - 1, (batch, SEQ), generator=generator)
    targets[:, 0] = -100
    return targets


def test_every_registered_controller_is_covered():
    assert set(CONTROLLERS.names()) == set(SETTINGS)


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_controller_runs_on_every_architecture(arch, name, mode):
    model = SMALL.model(arch, halt_token_id=HALT_ID)
    controller = build_controller(name, **SETTINGS[name]).train(mode == "train")
    controller.bind(model)  # as a trainer does before building its optimiser
    tokens, targets = SMALL.tokens(), _targets()
    for granularity in controller.granularities:
        out = run_loop(model, tokens, controller, max_loops=4, min_loops=2,
                       granularity=granularity, targets=targets, mode=mode)
        unit = (4,) if granularity == "sample" else (4, SEQ)
        assert out.logits.shape == (4, SEQ, VOCAB)
        assert out.depth.shape == unit and out.depth.dtype == torch.long
        low = 1 if name == "solver" else 2  # the solver does not enforce min_loops (documented)
        assert ((out.depth >= low) & (out.depth <= 4)).all()
        loss = sum(out.loss_terms.values())
        assert torch.isfinite(loss)
        if mode == "train":
            model.zero_grad()
            controller.zero_grad()
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)


def _halting_params(model, controller):
    if controller.name == "q_halt":
        return list(controller.head.parameters())
    if controller.name == "halt_token":  # the halt token's row of the LM head
        head = model.head if hasattr(model, "head") else model.lm_head
        return [head.weight]
    head = model.halt if hasattr(model, "halt") else model.halt_head
    return list(head.parameters())


@pytest.mark.parametrize("arch", ["toy", "serial_loop", "parallel_loop"])
@pytest.mark.parametrize("name,term", [("act", "ponder"), ("act", "task"), ("pondernet", "kl"),
                                       ("pondernet", "task"), ("ouro_gate", "entropy"),
                                       ("ouro_gate", "task"), ("halt_token", "task"),
                                       ("q_halt", "q_halt"), ("q_halt", "q_continue")])
def test_each_learned_objective_reaches_the_halting_head(arch, name, term):
    model = SMALL.model(arch, halt_token_id=HALT_ID)
    controller = build_controller(name).train()
    controller.bind(model)
    if name == "q_halt":  # at its init q_continue sits exactly on its own target (zero grad)
        torch.nn.init.normal_(controller.head.weight, std=0.1)
    out = run_loop(model, SMALL.tokens(), controller, max_loops=4, targets=_targets(),
                   mode="train")
    out.loss_terms[term].backward()
    params = _halting_params(model, controller)
    if name == "halt_token":
        grad = params[0].grad[HALT_ID]
    else:
        grad = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    assert grad.abs().sum() > 0


# -- convergence ---------------------------------------------------------------------------------
class _Readout(torch.nn.Module):
    """A stand-in model whose readout returns prepared logits (for criterion checks)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def readout(self, z, ctx):
        return self.logits


def _view(k, z, z_prev, logits):
    rows = torch.arange(z.shape[0])
    return StepView(_Readout(logits), None, k, z, z_prev, rows, "sample", None, 10)


def test_criterion_values_match_hand_computation():
    torch.manual_seed(0)
    z0, z1, z2 = torch.randn(3, 2, 3, 4).unbind(0)
    l1, l2 = torch.randn(2, 2, 3, 5).unbind(0)
    memory = RunState(batch=2, seq_len=3, max_loops=10)
    kl_fn, ent_fn, arg_fn, acc_fn = (CRITERIA.get(n)[0] for n in
                                     ("kl", "entropy", "argmax", "acceleration"))
    first = _view(0, z1, z0, l1)
    assert torch.isinf(kl_fn(first, memory)).all() and torch.isinf(ent_fn(first, memory)).all()
    assert torch.isinf(arg_fn(first, memory)).all() and torch.isinf(acc_fn(first, memory)).all()
    second = _view(1, z2, z1, l2)
    p1, p2 = l1.softmax(-1), l2.softmax(-1)
    kl_prev_new = (p1 * (p1.log() - p2.log())).sum(-1)
    torch.testing.assert_close(kl_fn(second, memory), kl_prev_new)  # KL(p_{k-1} || p_k)
    kl_new_prev = (p2 * (p2.log() - p1.log())).sum(-1)
    assert not torch.allclose(kl_prev_new, kl_new_prev, atol=1e-3)
    entropy = lambda p: -(p * p.log()).sum(-1)
    torch.testing.assert_close(ent_fn(second, memory), (entropy(p2) - entropy(p1)).abs())
    assert arg_fn(second, memory).tolist() == (l1.argmax(-1) != l2.argmax(-1)).float().tolist()
    accel = ((z2 - z1) - (z1 - z0)).norm(dim=-1) / z2.norm(dim=-1)
    torch.testing.assert_close(acc_fn(second, memory), accel)
    residual = (z2 - z1).norm(dim=-1) / z2.norm(dim=-1)
    torch.testing.assert_close(CRITERIA.get("residual")[0](second, memory), residual)
    cosine = 1 - torch.nn.functional.cosine_similarity(z2, z1, dim=-1)
    torch.testing.assert_close(CRITERIA.get("cosine")[0](second, memory), cosine)


def _frozen_toy():
    """A toy whose step leaves the state unchanged: every criterion passes as soon as defined."""
    model = SMALL.model("toy", scale=0.0)
    model.init_state = lambda ctx: ctx.inject.detach().clone()
    return model


@pytest.mark.parametrize("criterion,check_every,expected", [
    ("residual", 1, 1), ("cosine", 1, 1), ("kl", 1, 2), ("entropy", 1, 2),
    ("argmax", 1, 6),        # defined from loop 2, patience 5: loops 2..6
    ("acceleration", 1, 3),  # defined from loop 2, two-hit rule: loops 2 and 3
    ("residual", 3, 3),
])
def test_convergence_patience_and_check_every(criterion, check_every, expected):
    controller = build_controller("convergence", criterion=criterion, check_every=check_every)
    out = run_loop(_frozen_toy(), SMALL.tokens(), controller, max_loops=10)
    assert out.depth.tolist() == [expected] * 4
    assert out.executed == 4 * expected
    assert out.trace[criterion].shape == (expected, 4)


def test_convergence_min_loops_and_token_granularity():
    controller = build_controller("convergence", criterion="residual", min_loops=4)
    out = run_loop(_frozen_toy(), SMALL.tokens(), controller, max_loops=10, granularity="token")
    assert (out.depth == 4).all() and out.depth.shape == (4, SEQ)
    model = SMALL.model("toy")
    loose = build_controller("convergence", criterion="residual", threshold=0.2)
    tokenwise = run_loop(model, SMALL.tokens(), loose, max_loops=12, granularity="token")
    samplewise = run_loop(model, SMALL.tokens(), loose, max_loops=12)
    # a sample stops when its slowest token does (reduce="max")
    assert (samplewise.depth == tokenwise.depth.amax(dim=1)).all()
    assert tokenwise.executed < samplewise.executed * SEQ


# -- learned controllers -------------------------------------------------------------------------
def _filled(trace):
    """Trace (K, B) with NaN after exit -> the values up to exit, the rest 0.5 (unused)."""
    return torch.nan_to_num(trace, nan=0.5)


@pytest.mark.parametrize("inference", ["threshold", "cdf", "sample"])
def test_pondernet_eval_exit_rules(inference):
    model = SMALL.model("toy")
    torch.nn.init.normal_(model.halt.weight, std=0.5)
    torch.nn.init.constant_(model.halt.bias, -1.0)
    tokens = SMALL.tokens(batch=8)
    controller = build_controller("pondernet", inference=inference, threshold=0.3).eval()
    with torch.no_grad():
        out = run_loop(model, tokens, controller, max_loops=6)
    lam = _filled(out.trace["halt_prob"])  # (K, B)
    steps = torch.arange(1, lam.shape[0] + 1).unsqueeze(1)
    if inference == "threshold":
        hit = (lam >= 0.3) & (steps <= out.depth)
        hit[-1] = True
        assert out.depth.tolist() == (hit.float().argmax(0) + 1).clamp_max(6).tolist()
    elif inference == "cdf":
        padded = torch.cat([lam, torch.full((6 - lam.shape[0], 8), 0.5)])
        assert out.depth.tolist() == cdf_exit(geometric_halting(padded), 0.3).tolist()
    else:
        again = run_loop(model, tokens, build_controller("pondernet", inference="sample").eval(),
                         max_loops=6)
        other = run_loop(model, tokens, build_controller("pondernet", inference="sample",
                                                         seed=1).eval(), max_loops=6)
        assert out.depth.tolist() == again.depth.tolist()  # seeded
        assert out.depth.tolist() != other.depth.tolist() or out.depth.unique().numel() == 1
    assert out.executed == int(out.depth.sum())


@pytest.mark.parametrize("name", ["pondernet", "ouro_gate", "halt_token"])
def test_geometric_training_runs_every_step_and_reports_its_exit(name):
    model = SMALL.model("toy", halt_token_id=HALT_ID)
    controller = build_controller(name).train()
    out = run_loop(model, SMALL.tokens(), controller, max_loops=5, targets=_targets(),
                   mode="train")
    assert out.executed == 4 * 5 and out.step_logits.shape == (5, 4, SEQ, VOCAB)
    p = out.aux["p"]
    torch.testing.assert_close(p.sum(0), torch.ones(4))
    if name != "pondernet":  # Q-exit on the training trajectory
        assert out.depth.tolist() == cdf_exit(p.detach(), 0.5).tolist()
    rows = torch.arange(4)
    torch.testing.assert_close(out.logits, out.step_logits[out.depth - 1, rows])


def test_ouro_eval_q_exit_matches_the_trajectory_rule():
    model = SMALL.model("toy")
    torch.nn.init.normal_(model.halt.weight, std=0.5)
    tokens = SMALL.tokens(batch=8)
    controller = build_controller("ouro_gate", q=0.6)
    with torch.no_grad():
        trained = run_loop(model, tokens, controller.train(), max_loops=6, mode="train")
        evaluated = run_loop(model, tokens, controller.eval(), max_loops=6, mode="eval")
    assert evaluated.depth.tolist() == trained.depth.tolist()
    assert evaluated.executed == int(evaluated.depth.sum()) < trained.executed
    torch.testing.assert_close(evaluated.logits, trained.logits, atol=1e-5, rtol=0)


def test_halt_token_reads_the_lm_head_probability():
    model = SMALL.model("toy", halt_token_id=HALT_ID)
    with torch.no_grad():
        model.head.bias[HALT_ID] = 4.0  # the halt token dominates: lambda ~ 0.9 at once
        out = run_loop(model, SMALL.tokens(), build_controller("halt_token").eval(), max_loops=6)
        probs = model.readout(model.step(model.init_state(model.prepare(SMALL.tokens())),
                                         model.prepare(SMALL.tokens()), 0), None).softmax(-1)
    assert out.trace["halt_prob"][0].tolist() == pytest.approx(probs[:, -1, HALT_ID].tolist(),
                                                               rel=1e-5)
    assert (out.depth == 1).all()


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_act_output_is_the_p_weighted_mixture_of_step_readouts(granularity):
    model = SMALL.model("toy")
    torch.nn.init.normal_(model.halt.weight, std=0.3)
    torch.nn.init.constant_(model.halt.bias, -0.5)
    tokens = SMALL.tokens()
    with torch.no_grad():
        out = run_loop(model, tokens, build_controller("act"), max_loops=6,
                       granularity=granularity)
        fixed = run_loop(model, tokens, "fixed", max_loops=6, record=True)
        readouts = torch.stack([model.readout(z, None) for z in fixed.states[1:]])  # (K,B,T,V)
        h = torch.sigmoid(torch.stack([model.halt_logit(z, None) for z in fixed.states[1:]]))
    if granularity == "sample":
        h = h[..., -1]  # pool="last"
    p, exit_step, remainder = act_weights(h, eps=0.01)
    assert out.depth.tolist() == exit_step.tolist()
    if granularity == "token":  # frozen tokens change later ones: compare the first position
        p, out_logits, readouts = p[:, :, :1], out.logits[:, :1], readouts[:, :, :1]
        mixture = (p.unsqueeze(-1) * readouts).sum(0)
    else:
        out_logits = out.logits
        mixture = (p.view(*p.shape, 1, 1) * readouts).sum(0)
        torch.testing.assert_close(out.aux["remainder"], remainder)
    torch.testing.assert_close(out_logits, mixture, atol=1e-5, rtol=1e-5)


def test_q_halt_head_created_on_first_training_run_warns():
    model = SMALL.model("toy")
    with pytest.warns(UserWarning, match=r"Call controller.bind\(model\)"):
        run_loop(model, SMALL.tokens(), build_controller("q_halt").train(), max_loops=3,
                 mode="train")
    bound = build_controller("q_halt").train()
    bound.bind(model)
    assert [p.shape for p in bound.parameters()] == [(2, 32), (2,)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_loop(model, SMALL.tokens(), bound, max_loops=3, mode="train")
    with pytest.raises(ValueError, match="head width 8 != model d_model 32"):
        build_controller("q_halt", d_model=8).bind(model)


def test_q_halt_starts_never_halting_and_explores_in_training():
    model = SMALL.model("toy")
    controller = build_controller("q_halt", explore=1.0, seed=3)
    with torch.no_grad():
        out = run_loop(model, SMALL.tokens(), controller.eval(), max_loops=5)
    assert controller.head.weight.abs().sum() == 0
    assert controller.head.bias.tolist() == [-5.0, -5.0]
    assert (out.depth == 5).all()  # q_halt = q_continue = -5: never halts
    with torch.no_grad():
        controller.head.bias.copy_(torch.tensor([1.0, 0.0]))  # now always halts
        eager = run_loop(model, SMALL.tokens(), controller, max_loops=5)
        trained = run_loop(model, SMALL.tokens(), controller.train(), max_loops=5, mode="train")
    assert (eager.depth == 1).all() and eager.executed == 4
    # explore=1: every sample waits for its random minimum depth in [2, 5]
    assert trained.depth.tolist() == trained.aux["exploration_min"].tolist()
    assert ((trained.depth >= 2) & (trained.depth <= 5)).all()
    trm = build_controller("q_halt", mode="trm").eval()
    trm.bind(model)
    with torch.no_grad():
        trm.head.bias.copy_(torch.tensor([0.5, 3.0]))  # q_halt > 0 halts even if q_cont larger
        assert (run_loop(model, SMALL.tokens(), trm, max_loops=5).depth == 1).all()


def test_solver_depth_and_executed_accounting():
    model = SMALL.model("deq")
    controller = build_controller("solver", solver="fixed_point_iter", tol=1e-3)
    with torch.no_grad():
        out = run_loop(model, SMALL.tokens(), controller, max_loops=40, record=True)
    residuals = out.trace["solver_residual"]  # (K, B), row 0 = loop 0 (no solver residual)
    steps = (~residuals[1:].isnan()).sum(0)
    assert out.depth.tolist() == (1 + steps).tolist()
    assert out.executed == 4 + int(steps.sum())
    assert out.states.shape[0] == int(out.depth.max())
    for row, depth in enumerate(out.depth.tolist()):
        assert torch.isnan(out.states[depth:, row]).all()
        assert math.isfinite(out.states[depth - 1, row].sum().item())


@pytest.mark.parametrize("backward", ["implicit", "phantom", "one_step", "unroll"])
def test_solver_trains_with_every_backward_mode(backward):
    model = SMALL.model("deq").train()
    solver = "fixed_point_iter" if backward == "unroll" else "anderson"
    controller = build_controller("solver", solver=solver, tol=1e-3, backward=backward).train()
    out = run_loop(model, SMALL.tokens(), controller, max_loops=20, targets=_targets())
    out.loss_terms["task"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
