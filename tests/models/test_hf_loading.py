"""Loading, saving and the one-line errors of ``models.hf``; ``loopscope-diagnose`` on a local
Hugging Face checkpoint directory (a study on one: ``test_hf_study``)."""

from __future__ import annotations

import sys

import pytest
import torch
from _hf_tiny import hf_model, saved, tokens

from models import build_model
from models.hf import SUPPORTED_MODEL_TYPES, RetrofitLoop, from_pretrained, save_pretrained


@pytest.mark.parametrize("injection", ["none", "concat"])
def test_adapter_round_trip_restores_settings_and_weights(injection, tmp_path):
    model = RetrofitLoop(hf_model("qwen3"), (1, 4), injection).eval()
    with torch.no_grad():  # make the adapter's own weights differ from their init
        model.halt_head.bias.fill_(0.7)
        if model.adapter is not None:
            model.adapter.weight.mul_(0.5)
    x = tokens()
    with torch.no_grad():
        want, want_halt = model(x, loops=3), model.halt_logit(model.prepare(x).inject, None)
    save_pretrained(model, tmp_path / "saved")
    loaded = from_pretrained(tmp_path / "saved")  # no settings repeated
    assert loaded.config.loop_layers == (1, 4) and loaded.config.injection == injection
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, loops=3), want, rtol=0, atol=0)
        torch.testing.assert_close(loaded.halt_logit(loaded.prepare(x).inject, None), want_halt)


def test_build_model_accepts_the_hydra_section(tmp_path):
    _, directory = saved("gpt2", tmp_path)
    section = {"arch": "hf_retrofit", "path": str(directory), "loop_layers": [2, 3],
               "injection": "add", "attn_implementation": None}
    model = build_model(section)
    assert model.config.loop_layers == (2, 3) and model.config.injection == "add"


def test_errors_are_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a local directory"):
        from_pretrained(tmp_path / "missing", loop_layers=(0, 1))
    with pytest.raises(ValueError, match="not a local directory"):
        from_pretrained("meta-llama/Llama-3.2-1B", loop_layers=(0, 1))  # never a hub download
    with pytest.raises(ValueError, match="no config.json"):
        from_pretrained(tmp_path, loop_layers=(0, 1))
    _, directory = saved("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match=r"0 <= a < b <= 4 .* got \(2, 9\)"):
        from_pretrained(directory, loop_layers=(2, 9))
    with pytest.raises(ValueError, match="needs loop_layers"):
        from_pretrained(directory)
    with pytest.raises(ValueError, match="injection must be one of"):
        from_pretrained(directory, loop_layers=(0, 1), injection="sum")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        from_pretrained(directory, loop_layers=(0, 1), attn_implementation="flash_attention_2")
    bert = pytest.importorskip("transformers").BertConfig(hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=2)
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="unsupported model_type 'bert'.*supported: llama"):
        from_pretrained(tmp_path / "bert", loop_layers=(0, 1))
    _, hrm_dir = saved("hrm_text", tmp_path / "hrm")
    with pytest.raises(ValueError, match="natively looped"):
        from_pretrained(hrm_dir, loop_layers=(0, 1))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were absent
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        from_pretrained(directory, loop_layers=(0, 1))
    assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gpt2",
                                          "hrm_text"}


def test_diagnose_takes_a_checkpoint_directory(tmp_path, capsys):
    from experiments.cli.tools import diagnose_main

    saved("llama", tmp_path / "ck")  # vocab 50 and 64 positions fit the parity task
    diagnose_main([str(tmp_path / "ck"), "--loop-layers", "1", "3", "--task", "parity",
                   "--loops", "8", "--batch", "4"])
    out = capsys.readouterr().out
    assert "unrolled 8 loops on 4 parity samples" in out
    rows = [line for line in out.splitlines() if "%" in line]
    assert sum(int(line.split()[-4]) for line in rows) == 4  # every sample got a verdict
    with pytest.raises(SystemExit) as exit_info:
        diagnose_main([str(tmp_path / "ck"), "--loop-layers", "1", "9", "--task", "parity"])
    assert exit_info.value.code == 2
    assert "loop_layers must be [a, b)" in capsys.readouterr().err


def test_a_bf16_checkpoint_runs_in_bf16(tmp_path):
    _, directory = saved("llama", tmp_path)
    model = from_pretrained(directory, loop_layers=(1, 3), injection="concat",
                            dtype=torch.bfloat16)
    x = tokens()
    with torch.no_grad():
        ctx = model.prepare(x)
        z = model.step(model.init_state(ctx), ctx, 0)
        assert model.readout(z, ctx).dtype == torch.bfloat16
        assert model.halt_logit(z, ctx).shape == (3, 12)
    with pytest.raises(ValueError, match=r"state z must have shape \(3, 12, 32\)"):
        model.step(z[:, :5], ctx, 1)
