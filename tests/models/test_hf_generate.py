"""``generate`` on the Hugging Face adapters (no decode cache: ``halting.uncached``): greedy tokens
equal the original model's own greedy continuation at one loop, every token's logits and depth
equal ``run_loop(granularity="token")`` on the whole sequence, batched prompts of different lengths
agree with one-by-one decoding, and stop tokens / bad modes behave."""

from __future__ import annotations

import pytest
import torch
from _hf_tiny import VOCAB, ScriptedExit, hf_model, saved

from halting import generate, run_loop
from models.hf import RetrofitLoop, from_pretrained


class PositionPlan(ScriptedExit):
    """Position t of row i stops after ``plan[i, t]`` loops, for sequences of any length."""

    def decide(self, view):
        return self.plan[view.rows, : view.z.shape[1]] == view.loops


def _greedy_hf(original: torch.nn.Module, prompt: torch.Tensor, n: int) -> list[int]:
    """The transformers model's own greedy continuation, one full forward per token."""
    seq = prompt.clone()
    made = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(original(seq.view(1, -1)).logits[0, -1].argmax())
            made.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
    return made


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_loop_greedy_equals_the_original_models_greedy(family, tmp_path):
    original, directory = saved(family, tmp_path)
    model = from_pretrained(directory, loop_layers=(1, 3)).eval()
    prompt = torch.tensor([3, 14, 15, 9, 2])
    out = generate(model, [prompt], "fixed", max_new_tokens=6, max_loops=1)
    assert out.mode == "uncached" and out.cache_bytes == 0
    assert out.sequences()[0] == _greedy_hf(original, prompt, 6)
    assert out.depth.tolist() == [[1] * 6]


def test_every_token_equals_the_full_sequence_loop_at_token_granularity():
    model = RetrofitLoop(hf_model("llama"), (1, 3), "add").eval()
    prompts = [torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([11, 12, 13])]
    plan = torch.tensor([[1, 3, 2, 4] * 4, [2, 2, 1, 3] * 4])  # (B, T) exits per position
    out = generate(model, prompts, PositionPlan(plan), max_new_tokens=5, max_loops=4,
                   return_logits=True)
    for b, prompt in enumerate(prompts):
        seq = torch.cat([prompt, out.tokens[b, :4]]).view(1, -1)  # the last token is not fed back
        full = run_loop(model, seq, PositionPlan(plan[b:b + 1]), max_loops=4,
                        granularity="token")
        at = torch.arange(len(prompt) - 1, seq.shape[1])
        torch.testing.assert_close(out.logits[b], full.logits[0, at], rtol=0, atol=1e-5)
        assert out.depth[b].tolist() == full.depth[0, at].tolist()
        assert out.depth[b].tolist() == plan[b, at].tolist()  # the plan reached the decode
    assert out.executed > int(out.depth.sum())  # uncached: earlier positions are recomputed


def test_a_batch_of_different_lengths_equals_decoding_each_prompt_alone():
    model = RetrofitLoop(hf_model("qwen2"), (1, 3)).eval()
    prompts = [torch.tensor([1, 2, 3, 4, 5, 6, 7]), torch.tensor([8, 9])]
    together = generate(model, prompts, "fixed", max_new_tokens=4, max_loops=3,
                        return_logits=True)
    for b, prompt in enumerate(prompts):
        alone = generate(model, [prompt], "fixed", max_new_tokens=4, max_loops=3,
                         return_logits=True)
        assert together.tokens[b].tolist() == alone.tokens[0].tolist()
        torch.testing.assert_close(together.logits[b], alone.logits[0], rtol=0, atol=1e-5)
    assert together.prompt_depth.tolist() == [[3] * 7, [3, 3, 0, 0, 0, 0, 0]]


def test_stop_tokens_and_sampling_on_an_adapter():
    model = RetrofitLoop(hf_model("llama"), (1, 3)).eval()
    prompt = [torch.tensor([4, 4, 4])]
    first = generate(model, prompt, "fixed", max_new_tokens=5, max_loops=2).tokens[0, 0]
    stopped = generate(model, prompt, "fixed", max_new_tokens=5, max_loops=2,
                       stop_tokens=[int(first)])
    assert stopped.lengths.tolist() == [1] and stopped.tokens.shape[1] == 1
    draws = [generate(model, prompt, "fixed", max_new_tokens=6, max_loops=2, temperature=1.0,
                      generator=torch.Generator().manual_seed(s)).tokens for s in (7, 7)]
    assert torch.equal(draws[0], draws[1])  # seeded sampling is reproducible
    assert int(draws[0].max()) < VOCAB


def test_cached_only_modes_are_refused_in_one_line():
    model = RetrofitLoop(hf_model("llama"), (1, 3)).eval()
    with pytest.raises(ValueError, match="mode='parallel' needs cached decoding"):
        generate(model, [[1, 2]], "fixed", max_new_tokens=2, max_loops=2, mode="parallel")
    with pytest.raises(ValueError, match="more than max_seq_len=64"):
        generate(model, [list(range(1, 40)) * 2], "fixed", max_new_tokens=1, max_loops=1)
