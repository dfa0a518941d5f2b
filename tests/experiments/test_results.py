"""Atomic writes, run loading and multirun collection."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from experiments import results as rs  # noqa: E402
from experiments.results.schema import RESULTS_COLUMNS  # noqa: E402


def results_frame(value: float = 1.0) -> pd.DataFrame:
    row = ["r0", "parity", "serial_loop", "ce", 2, "fixed", 2, "val", 2, "accuracy", value]
    return pd.DataFrame([row], columns=RESULTS_COLUMNS)


def test_atomic_text_and_bytes_roundtrip(tmp_path):
    path = rs.atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert path.read_text() == "hello"
    rs.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]  # no temp files left
    with pytest.raises(TypeError, match="bytes"):
        rs.atomic_write_bytes(path, "text")


def test_failing_writer_leaves_old_file_intact(tmp_path):
    path = tmp_path / "table.parquet"
    rs.write_parquet(results_frame(0.5), path)

    def broken(tmp):
        tmp.write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        rs.atomic_write(path, broken)
    assert pd.read_parquet(path)["value"].tolist() == [0.5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]
    bad = pd.DataFrame({"value": [object()]})  # pyarrow cannot serialise this
    with pytest.raises(Exception):  # noqa: B017 - whatever pyarrow raises
        rs.write_parquet(bad, path)
    assert pd.read_parquet(path)["value"].tolist() == [0.5]


def test_save_figure_writes_png(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = rs.save_figure(fig, tmp_path / "figures" / "line.png")
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_run_and_not_a_run(tmp_path):
    rs.write_parquet(results_frame(), tmp_path / "results.parquet")
    tables = rs.load_run(tmp_path)
    assert set(tables) == {"results"} and len(tables["results"]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="results.parquet is missing"):
        rs.load_run(empty)
    with pytest.raises(ValueError, match="does not exist"):
        rs.load_run(tmp_path / "nowhere")


def make_job(sweep, name, value=None, corrupt=False):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    if value is not None:
        rs.write_parquet(results_frame(value), job / "results.parquet")
    if corrupt:
        (job / "results.parquet").write_bytes(b"not parquet")


def test_collect_partial_multirun(tmp_path):
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    make_job(tmp_path, "0", 0.1)
    make_job(tmp_path, "1")  # unfinished
    make_job(tmp_path, "2", corrupt=True)  # killed while writing by a non-atomic writer
    make_job(tmp_path, "10", 0.3)
    (tmp_path / "notes").mkdir()  # not a job: no .hydra/
    frame, missing = rs.collect(tmp_path)
    assert missing == ["1", "2"]
    assert frame["job"].tolist() == ["0", "10"] and frame["value"].tolist() == [0.1, 0.3]
    assert set(RESULTS_COLUMNS) <= set(frame.columns)


def test_collect_nothing_finished_and_not_a_sweep(tmp_path):
    make_job(tmp_path, "0")
    frame, missing = rs.collect(tmp_path)
    assert frame.empty and "job" in frame.columns and missing == ["0"]
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="not a Hydra multirun"):
        rs.collect(other)
    with pytest.raises(ValueError, match="unknown table"):
        rs.collect(tmp_path, table="nope")


def test_validate_frame_names_missing_columns():
    frame = results_frame()
    assert rs.validate_frame(frame, RESULTS_COLUMNS) is frame
    with pytest.raises(ValueError, match=r"\['sample', 'token'\]"):
        rs.validate_frame(frame, ["loop", "sample", "token"])
