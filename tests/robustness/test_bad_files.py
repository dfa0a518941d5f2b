"""Bad files (issue #7): missing, truncated or corrupted checkpoints, a checkpoint whose config does
not match its weights, and directories that are not loopscope runs, for ``loopscope-diagnose``
and ``loopscope-plot``. Each gets one clear line and exit status 2, and nothing on disk changes
(bytes and modification times of every file are compared before and after).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from experiments.cli.tools import diagnose_main, plot_main
from experiments.tasks import build_task
from models import build_model, load_model, save_model


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tiny(n_layers: int = 1):
    task = build_task("parity")
    torch.manual_seed(0)
    return build_model("parallel_loop", vocab_size=task.vocab_size, max_seq_len=task.seq_len,
                       d_model=32, n_heads=2, n_layers=n_layers, window=4)


def _truncated(d: Path) -> Path:
    good = save_model(_tiny(), d / "good.safetensors")
    data = good.read_bytes()
    (d / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return d / "cut.safetensors"


def _garbage(d: Path) -> Path:
    (d / "junk.safetensors").write_bytes(b"\x00not a checkpoint" * 64)
    return d / "junk.safetensors"


def _flipped_header(d: Path) -> Path:
    data = bytearray(save_model(_tiny(), d / "m.safetensors").read_bytes())
    data[40:120] = b"\xff" * 80  # inside the JSON header
    (d / "m.safetensors").write_bytes(bytes(data))
    return d / "m.safetensors"


def _empty(d: Path) -> Path:
    (d / "empty.safetensors").write_bytes(b"")
    return d / "empty.safetensors"


def _sidecar_disagrees(d: Path) -> Path:
    path = save_model(_tiny(), d / "m.safetensors")
    config = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**config, "d_model": 64}))
    return path


def _weights_of_another_model(d: Path) -> Path:
    tensors = load_file(save_model(_tiny(n_layers=2), d / "two.safetensors"))
    config = json.dumps(_tiny(n_layers=1).config.to_dict(), sort_keys=True)
    save_file(tensors, d / "m.safetensors", metadata={"loopscope_config": config})
    return d / "m.safetensors"


def _wrong_shapes(d: Path) -> Path:
    model = _tiny()
    tensors = {k: v.clone() for k, v in load_file(save_model(model, d / "a.safetensors")).items()}
    name = next(k for k in tensors if k.endswith("qkv.weight"))
    tensors[name] = tensors[name][:-2]
    config = json.dumps(model.config.to_dict(), sort_keys=True)
    save_file(tensors, d / "m.safetensors", metadata={"loopscope_config": config})
    return d / "m.safetensors"


def _no_config(d: Path) -> Path:
    save_file({"x": torch.zeros(2)}, d / "m.safetensors")
    return d / "m.safetensors"


def _directory(d: Path) -> Path:
    (d / "dir.safetensors").mkdir()
    return d / "dir.safetensors"


# name -> (make the bad checkpoint in a folder, key words of the message)
CHECKPOINTS: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "missing": (lambda d: d / "nothing.safetensors", ["does not exist", "nothing.safetensors"]),
    "a directory": (_directory, ["dir.safetensors", "not a file"]),
    "empty": (_empty, ["empty.safetensors", "corrupt"]),
    "truncated": (_truncated, ["cut.safetensors", "truncated or corrupt"]),
    "garbage": (_garbage, ["junk.safetensors", "corrupt"]),
    "corrupted header": (_flipped_header, ["m.safetensors", "corrupt"]),
    "config beside it disagrees": (_sidecar_disagrees, ["disagrees", "d_model"]),
    "weights of another model": (_weights_of_another_model, ["does not match its config",
                                                             "blocks.1"]),
    "weights of the wrong shape": (_wrong_shapes, ["does not match its config", "shape"]),
    "no config in the file": (_no_config, ["loopscope_config"]),
    "not a .safetensors path": (lambda d: d / "model.pt", ["model.pt"]),
}


def _fails_cleanly(entry: Callable[[list[str]], None], argv: list[str], prog: str, capsys
                   ) -> str:
    with pytest.raises(SystemExit) as exited:
        entry(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", list(CHECKPOINTS), ids=list(CHECKPOINTS))
def test_diagnose_bad_checkpoint_one_line_exit_2_nothing_changed(case, tmp_path, capsys):
    make, words = CHECKPOINTS[case]
    path = make(tmp_path)
    before = _snapshot(tmp_path)
    line = _fails_cleanly(diagnose_main, [str(path), "--task", "parity", "--batch", "4",
                                          "--loops", "8"], "loopscope-diagnose", capsys)
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert _snapshot(tmp_path) == before


def test_load_model_on_a_corrupt_file_raises_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(_truncated(tmp_path))


def _not_a_run(d: Path) -> Path:
    (d / "notes.txt").write_text("not a run")
    return d


def _truncated_results(d: Path) -> Path:
    (d / "results.parquet").write_bytes(b"PAR1\x00\x01broken")
    (d / "status.json").write_text('{"status": "finished"}')
    return d


def _file_not_dir(d: Path) -> Path:
    (d / "results.parquet").write_bytes(b"x")
    return d / "results.parquet"


RUN_DIRS: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "missing": (lambda d: d / "nowhere", ["nowhere", "not a directory"]),
    "a file, not a directory": (_file_not_dir, ["results.parquet", "not a directory"]),
    "not a loopscope run": (_not_a_run, ["not a loopscope run", "results.parquet is missing"]),
    "truncated results": (_truncated_results, ["results.parquet"]),
}


@pytest.mark.parametrize("case", list(RUN_DIRS), ids=list(RUN_DIRS))
def test_plot_not_a_run_one_line_exit_2_nothing_changed(case, tmp_path, capsys):
    make, words = RUN_DIRS[case]
    path = make(tmp_path)
    before = _snapshot(tmp_path)
    line = _fails_cleanly(plot_main, [str(path)], "loopscope-plot", capsys)
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "figures").exists()
