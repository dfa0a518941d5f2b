"""``loopscope-generate``: prints continuations and depths, writes the per-token trace."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from experiments.cli.generate import main
from models import build_model, save_model


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("parallel_loop", vocab_size=258, max_seq_len=32, d_model=32, n_heads=2,
                        n_layers=1, window=4)
    return save_model(model, tmp_path / "model.safetensors")


def test_prints_depths_and_writes_json_trace(checkpoint, tmp_path, capsys):
    out = tmp_path / "trace.json"
    main([str(checkpoint), "--prompt", "def f(", "--tokens", "1 2 3", "--loops", "3",
          "--controller", "convergence", "--param", "criterion=residual", "--param",
          "threshold=0.3", "--max-new-tokens", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "depth per token" in printed and "'def f('" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 10 and {row["prompt"] for row in rows} == {0, 1}
    assert all(1 <= row["depth"] <= 3 for row in rows)


def test_parquet_trace_matches_printed_depths(checkpoint, tmp_path, capsys):
    out = tmp_path / "trace.parquet"
    main([str(checkpoint), "--tokens", "5 6", "--loops", "2", "--max-new-tokens", "4",
          "--out", str(out)])
    frame = pd.read_parquet(out)
    assert list(frame["depth"]) == [2, 2, 2, 2]
    assert "depth per token: 2 2 2 2" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--tokens", "1 x"], "--tokens must be space-separated integers"),
    (["--tokens", "1", "--stop", "999"], "outside the vocabulary"),
    (["--tokens", "1", "--controller", "nope"], "nope"),
    ([], "give a prompt"),
])
def test_bad_arguments_one_line_exit_2(checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
