"""The controller protocol: declared capabilities, a typed run state, a complete output, and a
controller driven by code other than run_loop."""

import pytest
import torch
from _tiny import SMALL

from halting import (
    Capabilities,
    LoopController,
    RunState,
    StepView,
    build_controller,
    run_loop,
    set_run_mode,
)


def test_driven_loop_must_declare_its_method():
    with pytest.raises(TypeError, match="declares drives_loop but does not define drive"):
        type("Driver", (LoopController,), {"capabilities": Capabilities(drives_loop=True)})
    with pytest.raises(ValueError, match=r"step_logits must be one of \('never', 'train'"):
        Capabilities(step_logits="sometimes")
    with pytest.raises(ValueError, match="static or drives the loop, not both"):
        Capabilities(static=True, drives_loop=True)


def test_decide_before_begin_is_a_clear_error():
    controller = build_controller("convergence")
    model, tokens = SMALL.model("toy"), SMALL.tokens()
    ctx = model.prepare(tokens)
    z = model.init_state(ctx)
    view = StepView(model, ctx, 0, model.step(z, ctx, 0), z, torch.arange(4), "sample", None, 3)
    with pytest.raises(RuntimeError, match=r"call begin\(RunState\) before decide"):
        controller.decide(view)


class _Forgetful(LoopController):
    name = "forgetful"
    capabilities = Capabilities(provides_logits="always")


def test_output_is_complete_or_the_run_fails():
    with pytest.raises(RuntimeError, match="'forgetful' declares that it provides the logits"):
        run_loop(SMALL.model("toy"), SMALL.tokens(), _Forgetful(), max_loops=2)
    out = run_loop(SMALL.model("toy"), SMALL.tokens(), "fixed", max_loops=2)
    assert isinstance(out.logits, torch.Tensor) and out.logits.shape[:2] == (4, 8)


def _drive_by_hand(model, tokens, controller, max_loops):
    """A minimal driver other than run_loop (as decoding would be): no compaction, exits kept."""
    training = set_run_mode(controller, model, "auto")
    batch, seq_len = tokens.shape
    controller.begin(RunState(batch=batch, seq_len=seq_len, max_loops=max_loops,
                              min_loops=controller.min_loops(), training=training))
    ctx = model.prepare(tokens)
    z = model.init_state(ctx)
    depth = torch.full((batch,), max_loops)
    running = torch.ones(batch, dtype=torch.bool)
    for k in range(max_loops):
        rows = running.nonzero().squeeze(1)
        z_new = model.step(z[rows], ctx.select(rows), k)
        stop = controller.decide(StepView(model, ctx.select(rows), k, z_new, z[rows], rows,
                                          "sample", None, max_loops))
        z = z.index_put((rows,), z_new)
        if stop is not None and k + 1 < max_loops:
            depth[rows[stop]] = k + 1
            running[rows[stop]] = False
        if not running.any():
            break
    return depth


@pytest.mark.parametrize("name,params", [
    ("convergence", {"criterion": "residual", "threshold": 0.1}), ("ouro_gate", {}),
    ("pondernet", {"inference": "cdf"})])
def test_protocol_drives_the_same_exits_outside_run_loop(name, params):
    model = SMALL.model("toy")
    torch.nn.init.normal_(model.halt.weight, std=0.5)
    tokens = SMALL.tokens(batch=8)
    with torch.no_grad():
        expected = run_loop(model, tokens, build_controller(name, **params), max_loops=8).depth
        by_hand = _drive_by_hand(model, tokens, build_controller(name, **params), 8)
    assert by_hand.tolist() == expected.tolist()
    assert expected.unique().numel() > 1  # the rule really separates rows here


def test_run_state_buffers_follow_original_rows():
    state = RunState(batch=4, seq_len=3, max_loops=5, granularity="token")
    assert state.buffer("streak", dtype=torch.long).shape == (4, 3)
    assert state.swap("top", torch.tensor([0, 2]), torch.tensor([[1.0], [2.0]])) is None
    previous = state.swap("top", torch.tensor([2]), torch.tensor([[5.0]]))
    assert previous.tolist() == [[2.0]] and state.buffers["top"][:, 0].tolist() == [1, 0, 5, 0]
