"""run_loop: fixed == model(x, loops), compaction counts and per-row equality, token granularity
(frozen saves token-steps and matches a causal reference; evolving computes everything), traces,
recorded states, truncated backprop, FLOPs, training-depth sampling."""

import math

import pytest
import torch
from _tiny import SMALL
from _toy import ScriptedExit, count_step_rows

from halting import build_controller, run_loop, sample_training_depth
from models import ARCHS

SEQ = SMALL.seq
ALL_ARCHS = ("toy", *ARCHS)


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_fixed_equals_model_forward(arch, granularity):
    model, tokens = SMALL.model(arch), SMALL.tokens()
    with torch.no_grad():
        torch.manual_seed(5)
        out = run_loop(model, tokens, build_controller("fixed", loops=3), max_loops=3,
                       granularity=granularity)
        torch.manual_seed(5)  # recurrent_depth draws its initial state
        reference = model(tokens, loops=3)
    torch.testing.assert_close(out.logits, reference, atol=1e-6, rtol=0)
    assert out.depth.shape == ((4,) if granularity == "sample" else (4, SEQ))
    assert (out.depth == 3).all()
    assert out.executed == 4 * 3 * (SEQ if granularity == "token" else 1)


def _half_plan(batch, early, late):
    plan = torch.full((batch,), late, dtype=torch.long)
    plan[0::2] = early  # alternate so compaction gathers non-contiguous rows
    return plan


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_sample_compaction_counts_and_matches_rows_alone(arch):
    model, tokens = SMALL.model(arch), SMALL.tokens(batch=6)
    # recurrent_depth draws a random z_0 per call: pin it so rows alone see the same z_0.
    model.init_state = lambda ctx: 0.1 * ctx.inject.detach().clone()
    plan = _half_plan(6, 2, 8)
    calls = count_step_rows(model)
    with torch.no_grad():
        out = run_loop(model, tokens, ScriptedExit(plan), max_loops=8)
    assert sum(calls) == 3 * 2 + 3 * 8 == out.executed
    assert out.depth.tolist() == plan.tolist()
    assert out.trace["active"].tolist() == [6, 6] + [3] * 6
    for row in range(6):
        with torch.no_grad():
            alone = run_loop(model, tokens[row:row + 1], "fixed", max_loops=int(plan[row]))
        torch.testing.assert_close(out.logits[row], alone.logits[0], atol=1e-5, rtol=0)


def _decreasing_token_plan(batch, early, late):
    """Depth non-increasing in position: every earlier position runs at least as long, so a
    causal model's frozen run equals the full run at each token's own depth."""
    plan = torch.full((batch, SEQ), late, dtype=torch.long)
    plan[0::2, SEQ // 2:] = early
    plan[1::2, SEQ - 2:] = early
    return plan


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_token_frozen_saves_token_steps_and_matches_causal_reference(arch):
    model, tokens = SMALL.model(arch), SMALL.tokens(batch=4)
    plan = _decreasing_token_plan(4, 2, 6)
    calls = count_step_rows(model, per_token=True)
    with torch.no_grad():
        torch.manual_seed(7)
        out = run_loop(model, tokens, ScriptedExit(plan), max_loops=6, granularity="token",
                       record=True)
        computed = sum(calls)
        torch.manual_seed(7)
        full = run_loop(model, tokens, "fixed", max_loops=6, record=True)
    expected = int(plan.sum())
    assert out.executed == expected == computed < 4 * SEQ * 6
    assert torch.equal(out.depth, plan)
    # The frozen state of token t in the last recorded step equals the full run at plan[b, t].
    last = out.states[-1]  # every row runs to 6 loops here
    reference = full.states[plan, torch.arange(4)[:, None], torch.arange(SEQ)]  # (B, T, D)
    torch.testing.assert_close(last, reference, atol=1e-5, rtol=0)
    if arch != "recurrent_depth":  # position-wise readout (no coda attention)
        expected_logits = model.readout(reference, model.prepare(tokens))
        torch.testing.assert_close(out.logits, expected_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["toy", "serial_loop"])
def test_token_evolving_computes_every_token_and_reads_out_at_exit(arch):
    model, tokens = SMALL.model(arch), SMALL.tokens(batch=4)
    plan = torch.full((4, SEQ), 5, dtype=torch.long)
    plan[:, 1::2] = 2
    plan[3] = 2  # row 3 finishes at loop 2 and leaves the batch
    calls = count_step_rows(model, per_token=True)
    with torch.no_grad():
        out = run_loop(model, tokens, ScriptedExit(plan), max_loops=5, granularity="token",
                       token_policy="evolving", record=True)
    assert out.executed == sum(calls) == SEQ * (4 * 2 + 3 * 3)
    exit_states = out.states[plan, torch.arange(4)[:, None], torch.arange(SEQ)]  # (B, T, D)
    assert torch.isfinite(exit_states).all()
    expected = model.readout(exit_states, model.prepare(tokens))
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    # Evolving: halted positions of running rows keep changing after their exit.
    assert not torch.allclose(out.states[5, 0, 1], out.states[2, 0, 1])
    assert torch.isnan(out.states[3:, 3]).all()  # row 3 left


def test_trace_and_states_are_nan_after_exit():
    model, tokens = SMALL.model("toy"), SMALL.tokens(batch=4)
    plan = torch.tensor([1, 3, 3, 5])
    with torch.no_grad():
        out = run_loop(model, tokens, ScriptedExit(plan), max_loops=5, record=True)
    assert out.states.shape == (6, 4, SEQ, 32)
    assert out.trace["residual"].shape == (5, 4)
    for row, depth in enumerate(plan.tolist()):
        assert torch.isfinite(out.trace["residual"][:depth, row]).all()
        assert torch.isnan(out.trace["residual"][depth:, row]).all()
        assert torch.isfinite(out.states[: depth + 1, row]).all()
        assert torch.isnan(out.states[depth + 1:, row]).all()
    z = out.states
    manual = (z[1, 0] - z[0, 0]).norm() / z[1, 0].norm()
    assert math.isclose(out.trace["residual"][0, 0].item(), manual.item(), rel_tol=1e-5)
    assert out.trace["active"].tolist() == [4, 3, 3, 1, 1]
    assert out.halted_at_cap == 0.25 and out.mean_depth == 3.0
    shares = torch.tensor([0.25, 0.5, 0.25])  # depths 1, 3, 3, 5
    assert out.exit_entropy() == pytest.approx(-(shares * shares.log()).sum().item())


def test_no_residual_trace_without_record():
    model, tokens = SMALL.model("toy"), SMALL.tokens()
    out = run_loop(model, tokens, "fixed", max_loops=3)
    assert "residual" not in out.trace and out.states is None
    assert out.trace["active"].tolist() == [4, 4, 4]


def test_grad_steps_truncates_backprop_to_last_steps():
    model, tokens = SMALL.model("toy"), SMALL.tokens()
    out = run_loop(model, tokens, build_controller("fixed", loops=4), max_loops=4, grad_steps=1)
    out.logits.sum().backward()
    truncated = model.qkv.weight.grad.clone()
    model.zero_grad()
    ctx = model.prepare(tokens)
    z = model.init_state(ctx)
    with torch.no_grad():
        for k in range(3):
            z = model.step(z, ctx, k)
    model.readout(model.step(z, ctx, 3), ctx).sum().backward()
    torch.testing.assert_close(truncated, model.qkv.weight.grad)
    model.zero_grad()
    run_loop(model, tokens, "fixed", max_loops=4).logits.sum().backward()
    assert not torch.allclose(truncated, model.qkv.weight.grad)


def test_flops_count_executed_steps_and_readouts():
    model, tokens = SMALL.model("toy"), SMALL.tokens(batch=4)
    plan = torch.tensor([1, 3, 3, 5])
    out = run_loop(model, tokens, ScriptedExit(plan), max_loops=5)
    per_token = model.flops_per_token_step(SEQ)
    readout = 2 * 32 * 16 * 4 * SEQ
    assert out.flops == pytest.approx(out.executed * per_token * SEQ + readout)
    kl = run_loop(model, tokens, build_controller("convergence", criterion="kl"), max_loops=5)
    readouts_per_step = kl.trace["active"].sum().item() * SEQ
    assert kl.flops == pytest.approx(
        kl.executed * per_token * SEQ + 2 * 32 * 16 * (readouts_per_step + 4 * SEQ))


def test_sample_training_depth_is_seeded_clamped_and_heavy_tailed():
    draws = [sample_training_depth(8, generator=torch.Generator().manual_seed(s), max_loops=32)
             for s in range(400)]
    again = [sample_training_depth(8, generator=torch.Generator().manual_seed(s), max_loops=32)
             for s in range(400)]
    assert draws == again
    assert min(draws) >= 1 and max(draws) <= 32
    assert 7.0 < sum(draws) / len(draws) < 11.0  # E[r] = E[Poisson(tau)] + 1 = r_mean + 1
    assert max(draws) > 2 * 8  # heavy tail
    capped = [sample_training_depth(8, generator=torch.Generator().manual_seed(s), max_loops=4)
              for s in range(50)]
    assert max(capped) == 4


def test_generator_makes_a_random_initial_state_reproducible():
    model, tokens = SMALL.model("recurrent_depth", init_scale=0.5), SMALL.tokens()
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    with torch.no_grad():
        torch.manual_seed(0)
        first = run_loop(model, tokens, "fixed", max_loops=3, generator=gen(11), record=True)
        rng_after = torch.get_rng_state()
        torch.manual_seed(1)  # the global RNG plays no part
        again = run_loop(model, tokens, "fixed", max_loops=3, generator=gen(11), record=True)
        other = run_loop(model, tokens, "fixed", max_loops=3, generator=gen(12), record=True)
        forward = model(tokens, loops=3, generator=gen(11))
    torch.manual_seed(0)
    assert torch.equal(torch.get_rng_state(), rng_after)  # run_loop drew nothing from it
    assert torch.equal(first.states[0], again.states[0])
    assert torch.equal(first.logits, again.logits)
    assert not torch.allclose(first.states[0], other.states[0])
    torch.testing.assert_close(forward, first.logits, atol=1e-6, rtol=0)
