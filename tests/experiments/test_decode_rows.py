"""``experiments.evaluate.decode``: the study's decode prompts end at the task's answer, and a
learned model gets a row under its own per-token controller beside ``fixed`` at its cap."""

from __future__ import annotations

import pytest
import torch

from experiments.evaluate.decode import decode_prompts, decode_rows
from experiments.tasks import build_task
from experiments.train import TrainPlan, TrainResult
from halting import build_controller, generate
from models import build_model


def test_parity_prompts_are_the_input_through_the_answer_marker():
    task = build_task("parity", max_len=6)  # seq_len 13: val inputs of <= 7 tokens
    prompts, answers, new = decode_prompts(task, 8, 16, seed=0)
    drawn = task.batch("val", 8, torch.Generator().manual_seed(211))
    for prompt, row, target, answer in zip(prompts, drawn.tokens, drawn.targets, answers):
        assert prompt[-1] == task.EQ and (prompt[:-1] >= task.ZERO).all()  # bits, then `=`
        assert prompt.numel() >= 3  # 2..6 bits and `=`: the whole input, never cut
        assert torch.equal(prompt, row[: prompt.numel()])
        assert answer == target[prompt.numel() - 1]  # the parity at `=`
        assert answer == (prompt[:-1] == task.ONE).sum() % 2 + task.ZERO
    # 16 does not fit after the longest prompt: the count is lowered, the prompts are kept
    assert new == task.seq_len + 1 - max(p.numel() for p in prompts) and 1 < new < 16


def test_s5_prompts_keep_every_supervised_prefix():
    task = build_task("s5", degree=3, max_len=6)
    prompts, answers, new = decode_prompts(task, 8, 4, seed=1)
    assert min(p.numel() for p in prompts) >= 2 and new == 4  # lengths 2..6, room for 4
    assert answers.shape == (8,) and answers.dtype == torch.long


def test_language_modelling_prompts_are_a_prefix_and_have_no_answer():
    task = build_task("pycode", seq_len=32, hard_seq_len=48, max_bytes=1_500_000)
    prompts, answers, new = decode_prompts(task, 2, 8, seed=0, max_len=32)
    assert answers is None and new == 8
    assert all(p.numel() == 25 for p in prompts)  # 32 + 1 - 8: the rest is generated


def _trained(task, objective, controller, loops):
    torch.manual_seed(0)
    model = build_model("parallel_loop", vocab_size=task.vocab_size, max_seq_len=task.seq_len,
                        d_model=16, n_heads=2, n_layers=1, window=4,
                        halt_token_id=task.halt_token_id).eval()
    plan = TrainPlan(f"toy-{objective}", "parallel_loop", {}, objective, controller, loops)
    return TrainResult(plan, model, build_controller(controller))


def test_learned_model_gets_its_controller_row_and_fixed_at_the_cap():
    task = build_task("parity", max_len=6)
    fixed = _trained(task, "fixed", {"name": "fixed", "loops": 2}, 2)
    learned = _trained(task, "ouro_gate", {"name": "ouro_gate"}, 3)
    cfg = {"decode_tokens": 4, "decode_batch": 3}
    data = decode_rows([fixed, learned], task, cfg, 0, torch.device("cpu"))
    rows = {(r["run"], r["controller"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {("toy-fixed", "fixed", "parallel"), ("toy-ouro_gate", "fixed", "parallel"),
                         ("toy-ouro_gate", "ouro_gate", "sequential"),
                         ("toy-ouro_gate", "fixed", "sequential")}
    own = rows["toy-ouro_gate", "ouro_gate", "sequential"]
    prompts, answers, new = decode_prompts(task, 3, 4, 0)
    out = generate(learned.model, prompts, learned.controller, max_new_tokens=new, max_loops=3,
                   mode="sequential")
    assert own["mean_depth"] == pytest.approx(out.mean_depth)  # the depth it really used
    assert own["answer_accuracy"] == pytest.approx(
        float((out.tokens[:, 0] == answers).float().mean()))
    assert own["ratio_to_fixed_cap"] == pytest.approx(
        own["ms_per_token"] / rows["toy-ouro_gate", "fixed", "sequential"]["ms_per_token"])
    assert rows["toy-fixed", "fixed", "parallel"]["mean_depth"] == 2
    assert 1 <= own["mean_depth"] <= 3
    assert data["settings"]["new_tokens"] == new == 4


def test_a_controller_that_cannot_decide_per_token_is_skipped_with_the_reason():
    task = build_task("parity", max_len=6)
    learned = _trained(task, "q_halt", {"name": "q_halt"}, 3)  # HRM's halting: per sample only
    data = decode_rows([learned], task, {"decode_tokens": 2, "decode_batch": 2}, 0,
                       torch.device("cpu"))
    assert [r["controller"] for r in data["rows"]] == ["fixed"]
    assert data["skipped"][0]["controller"] == "q_halt"
    assert "not per token" in data["skipped"][0]["reason"]
