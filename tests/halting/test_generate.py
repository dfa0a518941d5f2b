"""``halting.generate``: cached decoding equals the full-sequence forward, for every architecture.

Tiny seeded models (d_model 32, 2 layers, window 4 < the sequence, so PLT's ring matters)."""

from __future__ import annotations

import pytest
import torch

from halting import build_controller, generate, run_loop
from halting.base import LoopController
from models import ARCHS, build_model

TINY = dict(vocab_size=32, max_seq_len=24, d_model=32, n_heads=2, n_layers=2, mlp_ratio=2,
            window=4, prelude_layers=1, coda_layers=1)
PADDED = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]  # right-padded inside generate
EQUAL = [[1, 2, 3, 4], [5, 6, 7, 8]]
ATOL = 1e-5


def tiny(arch: str, **overrides: object):
    torch.manual_seed(0)
    extra = {"init_scale": 0.0} if arch == "recurrent_depth" else {}  # deterministic s_0
    return build_model(arch, **{**TINY, **extra, **overrides}).eval()


class SignExit(LoopController):
    """Exit when the state's first feature turns positive: a per-token rule on the state only,
    so depths vary from token to token (exercises the frozen cache fill)."""

    name = "sign_exit"

    def decide(self, view):
        return view.z[..., 0] > 0


def sampled(model, prompts, controller, loops, mode="auto", seed=3, new=8):
    return generate(model, prompts, controller, max_new_tokens=new, max_loops=loops,
                    temperature=1.0, generator=torch.Generator().manual_seed(seed),
                    return_logits=True, mode=mode)


def continued(prompt, out, b):
    """The sequence whose positions produced row b's logits: prompt + all but the last token."""
    return torch.tensor(prompt + out.tokens[b, :-1].tolist()).unsqueeze(0)


@pytest.mark.parametrize("prompts", [PADDED, EQUAL], ids=["padded", "equal"])
@pytest.mark.parametrize("loops", [1, 2, 3, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_fixed_decode_logits_equal_full_forward(arch, loops, prompts):
    model = tiny(arch)
    out = sampled(model, prompts, "fixed", loops)
    assert out.tokens.shape == (2, 8) and bool((out.depth == loops).all())
    for b, prompt in enumerate(prompts):
        reference = model(continued(prompt, out, b), loops=loops)[0, len(prompt) - 1:]
        torch.testing.assert_close(out.logits[b], reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("loops", [2, 3, 4])
def test_plt_parallel_decode_equals_sequential(loops):
    model = tiny("parallel_loop")
    parallel = sampled(model, PADDED, "fixed", loops, mode="parallel")
    sequential = sampled(model, PADDED, "fixed", loops, mode="sequential")
    assert (parallel.mode, sequential.mode) == ("parallel", "sequential")
    assert torch.equal(parallel.tokens, sequential.tokens)
    torch.testing.assert_close(parallel.logits, sequential.logits, atol=ATOL, rtol=0)


def adaptive_cases():
    for arch in ARCHS:
        modes = ("parallel", "sequential") if arch == "parallel_loop" else ("sequential",)
        for mode in modes:
            yield arch, mode


@pytest.mark.parametrize("prompts", [PADDED, [[1, 2, 3, 4, 5]]], ids=["padded", "single"])
@pytest.mark.parametrize("criterion", ["sign", "residual"])
@pytest.mark.parametrize(("arch", "mode"), list(adaptive_cases()))
def test_adaptive_decode_agrees_with_token_run_loop(arch, mode, criterion, prompts):
    """Padded rows take the per-row cache fill; a single row the one-slice fill."""
    model = tiny(arch)
    controller = SignExit() if criterion == "sign" else build_controller(
        "convergence", criterion="residual", threshold=0.3)
    out = sampled(model, prompts, controller, 4, mode=mode)
    for b, prompt in enumerate(prompts):
        ref = run_loop(model, continued(prompt, out, b), controller, max_loops=4,
                       granularity="token", token_policy="frozen")
        start = len(prompt) - 1
        assert torch.equal(out.depth[b], ref.depth[0, start:])
        assert torch.equal(out.prompt_depth[b, : len(prompt)], ref.depth[0, : len(prompt)])
        torch.testing.assert_close(out.logits[b], ref.logits[0, start:], atol=ATOL, rtol=0)
    if criterion == "sign":  # the case must exercise exits before the cap
        assert bool((out.depth < 4).any())


def test_sequential_exits_save_compute_parallel_does_not():
    model = tiny("parallel_loop")
    sequential = sampled(model, PADDED, SignExit(), 4, mode="sequential")
    parallel = sampled(model, PADDED, SignExit(), 4, mode="parallel")
    assert torch.equal(sequential.depth, parallel.depth)
    decoded = sequential.depth[:, 1:]  # tokens after the first come from decode steps
    padding = sum(len(max(PADDED, key=len)) - len(p) for p in PADDED)  # run loop 0 only
    prefill = int(sequential.prompt_depth.sum()) + padding
    assert sequential.executed == prefill + int(decoded.sum())
    assert parallel.executed == prefill + 4 * decoded.numel()


def cache_bytes(arch, loops, capacity_tokens):
    model = tiny(arch)
    cache = model.new_decode_cache(1, capacity_tokens, loops)
    return cache.nbytes(), cache.layout()


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_memory_per_token(arch):
    per_slot = 2 * TINY["n_layers"] * TINY["d_model"] * 4  # keys + values, fp32, all layers
    for loops in (1, 2, 4):
        small, layout = cache_bytes(arch, loops, 10)
        large, _ = cache_bytes(arch, loops, 20)
        per_token = (large - small) / 10
        if arch == "parallel_loop":  # one full cache + (R-1) windows of w slots
            assert per_token == per_slot
            assert small == per_slot * (10 + (loops - 1) * TINY["window"])
            assert layout["global"]["slots"] == 10
            if loops > 1:
                assert layout["local"] == {"layers": 2, "loops": loops - 1, "slots": 4, "window": 4}
        elif arch == "recurrent_depth":  # R loop caches + the prelude's + the coda's
            assert per_token == per_slot * loops + per_slot  # 1 prelude + 1 coda layer = 2/2
        else:  # R full caches
            assert per_token == per_slot * loops


def test_parallel_ring_matches_window_past_its_size():
    """A prompt longer than the window: the ring's wrap-around must give the forward's logits."""
    model = tiny("parallel_loop")
    prompt = [list(range(1, 12))]
    out = sampled(model, prompt, "fixed", 3, mode="parallel", new=10)
    reference = model(continued(prompt[0], out, 0), loops=3)[0, 10:]
    torch.testing.assert_close(out.logits[0], reference, atol=ATOL, rtol=0)


def test_stop_tokens_end_rows_and_pad_after():
    model = tiny("serial_loop")
    free = generate(model, PADDED, "fixed", max_new_tokens=6, max_loops=2)
    stop = int(free.tokens[0, 2])
    out = generate(model, PADDED, "fixed", max_new_tokens=6, max_loops=2, stop_tokens=[stop],
                   pad_token_id=0)
    first = int((free.tokens[0] == stop).nonzero()[0])
    assert int(out.lengths[0]) == first + 1
    assert out.sequences()[0] == free.tokens[0, : first + 1].tolist()
    assert bool((out.tokens[0, first + 1:] == 0).all())
    assert bool((out.depth[0, first + 1:] == 0).all())


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny("deq")
    one = sampled(model, EQUAL, "fixed", 2, seed=5)
    two = sampled(model, EQUAL, "fixed", 2, seed=5)
    assert torch.equal(one.tokens, two.tokens)
    greedy = generate(model, EQUAL, "fixed", max_new_tokens=8, max_loops=2)
    top1 = generate(model, EQUAL, "fixed", max_new_tokens=8, max_loops=2, temperature=0.7,
                    top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.tokens, top1.tokens)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompt_tokens": [[1, 2], []]}, "prompt 1 is empty"),
    ({"prompt_tokens": []}, "prompt_tokens is empty"),
    ({"prompt_tokens": [list(range(25))]}, "more than max_seq_len=24"),
    ({"prompt_tokens": [list(range(20))], "max_new_tokens": 6}, "max_seq_len=24"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
    ({"stop_tokens": [32]}, "stop/pad token 32 is outside the vocabulary [0, 32)"),
    ({"temperature": -1.0}, "temperature must be"),
    ({"mode": "fast"}, "mode must be one of"),
])
def test_bad_input_one_clear_error(kwargs, message):
    model = tiny("parallel_loop")
    args = {"prompt_tokens": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        generate(model, args.pop("prompt_tokens"), "fixed", max_loops=2, **args)


def test_controller_without_token_granularity_is_refused():
    with pytest.raises(ValueError, match="cannot decide per token"):
        generate(tiny("serial_loop"), [[1, 2]], "q_halt", max_new_tokens=2, max_loops=2)


def test_parallel_mode_needs_clp():
    with pytest.raises(ValueError, match="clp=True"):
        generate(tiny("parallel_loop", clp=False), [[1, 2]], "fixed", max_new_tokens=2,
                 max_loops=2, mode="parallel")


def test_bench_alternating_exit_gives_the_planned_depths():
    """The decode benchmark's adaptive row relies on this schedule (experiments.bench.decode)."""
    from experiments.bench.decode import AlternatingExit

    out = generate(tiny("serial_loop"), [[1, 2, 3]], AlternatingExit((1, 3)), max_new_tokens=6,
                   max_loops=4)
    assert out.depth[0].tolist() == [1, 3, 1, 3, 1, 3]  # prompt run, then one run per token
    assert out.executed == 3 * 1 + (3 + 1) * 2 + 3  # prompt + five decoded tokens' loops
