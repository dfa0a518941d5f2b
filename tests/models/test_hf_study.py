"""A loopscope study on a local Hugging Face checkpoint (``model=hf_retrofit model.path=...``):
fine-tuned at each loop count like the built-in architectures, or evaluated as loaded; stored in
the run directory so it resumes and reloads; its checkpoint's identity in the run fingerprint;
one-line errors when the checkpoint or the task does not fit. Tiny random-init checkpoints are
built in each test (nothing is downloaded)."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import torch
from _app_helpers import compose_cfg
from _hf_tiny import hf_config, saved, transformers

from experiments.config.validate import ConfigError, validate_config
from experiments.study import plan_models, run
from experiments.train import DistInfo
from experiments.train.trainer import _Trainer
from models import load_model
from models.hf import checkpoint_identity

# the smallest study that trains, checkpoints and evaluates (parity: 5 token ids, 17 positions);
# smoke's model sizes do not apply to a checkpoint and are removed
SMALL = ["experiment=smoke", "~model.d_model", "~model.n_layers", "~model.window",
         "~eval.controllers.solver", "eval.figures=false", "eval.attention_samples=0",
         "eval.unroll=2", "eval.verdict_loops=7", "eval.batch_size=8", "eval.trace_samples=1",
         "eval.spectral_samples=1", "eval.spectral_iters=2", "train.steps=4",
         "train.batch_size=8", "train.eval_batch_size=8", "train.eval_every=0",
         "train.checkpoint_every=2"]


def hf_overrides(path, *extra: str) -> list[str]:
    return [*SMALL, "model=hf_retrofit", f"model.path={path}", "model.loop_layers=[1,3]",
            *extra]


@pytest.fixture
def llama(tmp_path):
    """A 4-layer d=32 random-init Llama saved to a directory (vocab 50, 64 positions)."""
    return saved("llama", tmp_path / "llama")[1]


def test_a_study_fine_tunes_the_checkpoint_and_trains_the_halt_head(llama, tmp_path):
    out = tmp_path / "run"
    summary = run(compose_cfg(hf_overrides(llama, "study.train_loops=[2]",
                                           "study.max_loops=2")), out_dir=out)
    assert summary["status"] == "finished"
    results = pd.read_parquet(out / "results.parquet")
    assert set(results["run"]) == {"hf_retrofit-fixed-L2", "hf_retrofit-ouro_gate-L2"}
    assert set(results["arch"]) == {"hf_retrofit"}
    report = (out / "report.md").read_text()
    assert "Fine-tuned on the task from the Hugging Face checkpoint" in report
    assert "| hf_retrofit | 2 |" in report  # the quality-vs-loops table
    # the stored model is self-contained: it reloads without the checkpoint directory
    stored = out / "models" / "hf_retrofit-ouro_gate-L2" / "model.safetensors"
    model = load_model(stored)
    base = load_model(out / "models" / "hf_retrofit-fixed-L2" / "model.safetensors")
    assert model.config.loop_layers == (1, 3) and model.config.model_type == "llama"
    assert float(model.halt_head.bias.detach()) != pytest.approx(-2.0)  # trained away from its init
    original = transformers.AutoModelForCausalLM.from_pretrained(llama)
    changed = [n for n, p in model.hf.named_parameters()
               if not torch.equal(p, original.state_dict()[n])]
    assert changed  # fine-tuned: the checkpoint's own weights moved
    assert not torch.equal(model.hf.lm_head.weight, base.hf.lm_head.weight)


def test_stored_checkpoint_goes_through_loopscope_diagnose(llama, tmp_path, capsys):
    from experiments.cli.tools import diagnose_main

    out = tmp_path / "run"
    run(compose_cfg(hf_overrides(llama, "study.train_loops=[2]", "~study.learned.ouro_gate")),
        out_dir=out)
    diagnose_main([str(out / "models" / "hf_retrofit-fixed-L2" / "model.safetensors"),
                   "--loops", "8", "--batch", "4"])  # task read from train.json beside it
    text = capsys.readouterr().out
    assert "unrolled 8 loops on 4 parity samples" in text
    assert sum(int(line.split()[-4]) for line in text.splitlines() if "%" in line) == 4


def test_fine_tuning_lowers_the_training_loss(llama, tmp_path):
    cfg = compose_cfg(hf_overrides(llama, "study.train_loops=[2]", "~study.learned.ouro_gate",
                                   "train.steps=20", "train.warmup_steps=2", "train.lr=0.005",
                                   "train.batch_size=32"))
    valid = validate_config(cfg)
    plan = plan_models(valid.cfg, valid)[0]
    trainer = _Trainer(plan, valid.task, valid.cfg["train"], tmp_path / "m", 0, DistInfo(),
                       torch.device("cpu"))
    losses = [trainer._train_step()[0] for _ in range(20)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_trainable_head_trains_only_the_halting_head(llama, tmp_path):
    cfg = compose_cfg(hf_overrides(llama, "controller=ouro_gate", "study.max_loops=2",
                                   "~study.learned.ouro_gate", "model.trainable=head"))
    valid = validate_config(cfg)
    plan = plan_models(valid.cfg, valid)[0]
    trainer = _Trainer(plan, valid.task, valid.cfg["train"], tmp_path / "m", 0, DistInfo(),
                       torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer._train_step()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("halt_head.", "halt_norm.")) for n in changed), changed


def test_evaluation_only_evaluates_the_checkpoint_as_loaded(llama, tmp_path):
    out = tmp_path / "run"
    run(compose_cfg(hf_overrides(llama, "model.finetune=false", "study.train_loops=[1,2]")),
        out_dir=out)
    results = pd.read_parquet(out / "results.parquet")
    assert set(results["run"]) == {"hf_retrofit-fixed-L1"}  # one model; ouro_gate not trained
    assert {"fixed", "convergence_kl"} <= set(results["controller"])
    assert (results["metric"] == "spectral_radius").any()
    assert not (out / "models").exists()  # nothing trained, nothing written
    report = (out / "report.md").read_text()
    assert "**Not trained on the task** (model.finetune=false)" in report
    assert "learned objectives ouro_gate were not trained" in report
    info = json.loads((out / "run.json").read_text())
    assert [m["status"] for m in info["models"]] == ["not trained"]
    # one loop of the retrofitted model is the checkpoint itself: same accuracy as HF's logits
    valid = validate_config(compose_cfg(hf_overrides(llama, "model.finetune=false")))
    batch = valid.task.batch("val", 8, torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    ours = load_model_as_loaded(valid)
    with torch.no_grad():
        torch.testing.assert_close(ours(batch.tokens, loops=1), hf(batch.tokens).logits)


def load_model_as_loaded(valid):
    from models import build_model

    fields = {k: v for k, v in valid.models["hf_retrofit"].items() if k != "as_loaded"}
    return build_model(fields).eval()


def test_evaluation_only_refuses_a_controller_that_needs_training(llama):
    cfg = compose_cfg(hf_overrides(llama, "model.finetune=false",
                                   "+controller@eval.controllers.act=act"))
    with pytest.raises(ConfigError, match=r"eval.controllers.act \(act\) needs a trained "
                                          r"halting head.*~eval.controllers.act"):
        validate_config(cfg)


def test_resume_after_interruption_continues_from_the_checkpoint(llama, tmp_path, monkeypatch):
    overrides = hf_overrides(llama, "study.train_loops=[2]", "~study.learned.ouro_gate")
    run(compose_cfg(overrides), out_dir=tmp_path / "whole")
    original = _Trainer._save_checkpoint

    def save_then_die(self):
        original(self)
        raise KeyboardInterrupt  # killed right after the first checkpoint (step 2)

    monkeypatch.setattr(_Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(overrides), out_dir=tmp_path / "killed")
    monkeypatch.setattr(_Trainer, "_save_checkpoint", original)
    run(compose_cfg(overrides), out_dir=tmp_path / "killed")
    info = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert info["models"][0]["resumed_from"] == 2
    whole, killed = (pd.read_parquet(tmp_path / d / "results.parquet") for d in ("whole",
                                                                               "killed"))
    pd.testing.assert_frame_equal(whole, killed, check_exact=True)


def test_a_changed_checkpoint_at_the_same_path_is_never_resumed(llama, tmp_path):
    from experiments.results.rundir import RunDirError, check_fingerprint, result_config

    conf = validate_config(compose_cfg(hf_overrides(llama))).cfg
    before = result_config(conf, 0)
    assert before["model.checkpoint_sha256"] == checkpoint_identity(llama)
    check_fingerprint(tmp_path, before)
    torch.manual_seed(1)  # other weights, same config, same path
    transformers.AutoModelForCausalLM.from_config(hf_config("llama")).save_pretrained(llama)
    with pytest.raises(RunDirError, match="model.checkpoint_sha256"):
        check_fingerprint(tmp_path, result_config(conf, 0))


def test_errors_are_one_clear_line(llama, tmp_path, monkeypatch):
    def refused(*extra: str, path=llama) -> str:
        with pytest.raises(ConfigError) as info:
            validate_config(compose_cfg(hf_overrides(path, *extra)))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "is not a local directory" in refused(path=tmp_path / "missing")
    assert "no config.json" in refused(path=tmp_path)
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    bert.save_pretrained(tmp_path / "bert")
    assert "unsupported model_type 'bert'" in refused(path=tmp_path / "bert")
    assert "supported: llama, mistral, qwen2, qwen3, gpt2, hrm_text" in \
        refused(path=tmp_path / "bert")
    assert "0 <= a < b <= 4" in refused("model.loop_layers=[2,9]")
    assert "model.d_model does not apply to a Hugging Face checkpoint" in \
        refused("+model.d_model=64")
    assert "trainable must be one of all, loop, head" in refused("model.trainable=core")
    small = hf_config("llama")
    small.vocab_size = 4  # parity uses 5 token ids
    transformers.AutoModelForCausalLM.from_config(small).save_pretrained(tmp_path / "v4")
    message = refused(path=tmp_path / "v4")
    assert "task vocab_size=5" in message and "checkpoint's vocab_size=4" in message
    short = hf_config("llama")
    short.max_position_embeddings = 8  # smoke's parity (hard split included) needs 13 positions
    transformers.AutoModelForCausalLM.from_config(short).save_pretrained(tmp_path / "p8")
    message = refused(path=tmp_path / "p8")
    assert "sequences of 13 tokens" in message and "max_position_embeddings=8" in message
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were absent
    assert "pip install -e '.[hf]'" in refused()
