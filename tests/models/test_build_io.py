"""build_model, the registry, input validation and safetensors checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _tiny import TINY

from models import (
    ARCH_REGISTRY,
    ARCHS,
    LoopedModel,
    ModelConfig,
    build_model,
    load_model,
    save_model,
)


def test_registry_lists_every_arch():
    assert set(ARCH_REGISTRY.names()) == set(ARCHS)


@pytest.mark.parametrize("source", ["name", "dict", "config"])
def test_build_from_each_kind_of_input(source):
    values = {**TINY.config, "arch": "serial_loop"}
    arg = {"name": "serial_loop", "dict": values,
           "config": ModelConfig.from_dict(values)}[source]
    extra = {k: v for k, v in TINY.config.items() if k not in ("d_model", "n_heads")}
    model = build_model(arg, **(extra if source == "name" else {}), d_model=48, n_heads=4)
    assert isinstance(model, LoopedModel)
    assert model.config.d_model == 48 and model.config.arch == "serial_loop"


def test_build_rejects_unknown_field_and_arch():
    with pytest.raises(KeyError, match="unknown ModelConfig field.*loops.*known:.*d_model"):
        build_model("deq", loops=4)
    with pytest.raises(KeyError, match="unknown architecture 'resnet'.*parallel_loop"):
        build_model("resnet")
    with pytest.raises(TypeError, match="ModelConfig, a dict or an architecture name"):
        build_model(3)
    assert "loops" not in ModelConfig.field_names()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(arch="parallel_loop", window=32, max_seq_len=16), "window=32.*max_seq_len=16"),
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(gate_mode="soft"), "gate_mode must be one of"),
        (dict(arch="deq", injection="none"), "injection='none' is not allowed"),
        (dict(mlp="relu"), "mlp must be one of"),
    ],
)
def test_bad_config_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model({**TINY.config, **overrides})


def test_bad_inputs_are_named(arch):
    model = TINY.model(arch)
    good = TINY.tokens()
    cases = [
        (good + 32, r"token id \d+ outside \[0, 32\)"),
        (good - 40, r"token id -\d+ outside \[0, 32\)"),
        (good.float(), "integer ids.*float32"),
        (good[0], r"shape \(B, T\).*\(10,\)"),
        (torch.zeros(2, 17, dtype=torch.long), "T=17 exceeds max_seq_len=16"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            model(bad, loops=1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2]], loops=1)
    for loops in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="loops must be an integer >= 1"):
            model(good, loops=loops)
    ctx = model.prepare(good)
    z = model.init_state(ctx)
    with pytest.raises(ValueError, match="loop index k must be an integer >= 0"):
        model.step(z, ctx, -1)
    with pytest.raises(ValueError, match="state z must have shape"):
        model.step(z[:, :-1], ctx, 0)
    with pytest.raises(ValueError, match="active must be a bool mask"):
        model.step(z, ctx, 0, active=torch.ones(3, 10))


def test_safetensors_round_trip(arch, tmp_path):
    model = TINY.model(arch, tie_embeddings=arch != "serial_loop")
    with torch.no_grad():  # move every parameter off its init so a silent re-init would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_model(model, tmp_path / "ckpt.safetensors")
    assert json.loads((tmp_path / "ckpt.json").read_text()) == model.config.to_dict()
    loaded = load_model(path)
    assert loaded.config == model.config
    toks = TINY.tokens()
    torch.manual_seed(5)
    expected = model(toks, loops=3)
    torch.manual_seed(5)
    assert torch.equal(loaded(toks, loops=3), expected)


def test_load_rejects_mismatch_and_corruption(tmp_path):
    model = TINY.model("parallel_loop")
    path = save_model(model, tmp_path / "m.safetensors")
    other = save_model(TINY.model("parallel_loop", d_model=48, n_heads=4),
                       tmp_path / "o.safetensors")
    # the weights of a d_model=48 model under this config's name
    (tmp_path / "o.json").unlink()
    data = other.read_bytes().replace(b'd_model\\": 48', b'd_model\\": 32')
    assert data != other.read_bytes()
    other.write_bytes(data)
    with pytest.raises(ValueError, match="does not match its config"):
        load_model(other)
    # the config beside it disagrees with the metadata
    sidecar = tmp_path / "m.json"
    sidecar.write_text(json.dumps({**model.config.to_dict(), "n_layers": 3}))
    with pytest.raises(ValueError, match=r"disagrees with the metadata.*n_layers"):
        load_model(path)
    sidecar.unlink()
    # truncated file
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(truncated)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_model(model, tmp_path / "m.pt")


def test_config_round_trips_through_dict():
    cfg = ModelConfig.from_dict({**TINY.config, "arch": "deq"})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.asdict(cfg)["arch"] == "deq"
