"""Result tables on disk: atomic writes, loading one run, collecting a Hydra multirun.

Every file is written to a temporary file in the destination's directory and moved into place
with ``os.replace`` (atomic on POSIX and Windows within one file system), so a crash or a failing
writer never leaves a half-written file and never destroys the previous version.

A *run directory* holds ``results.parquet`` (required) and optionally ``traces.parquet`` and
``samples.parquet`` (column lists in ``experiments.results.schema``). A *sweep directory* is Hydra's
multirun output: numbered job subdirectories, each with a ``.hydra/`` folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.results.schema import RESULTS_COLUMNS

TABLES = ("results", "traces", "samples")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path`` atomically.

    Parent directories are created. If ``write`` raises, the temporary file is removed, the
    exception propagates and any existing file at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; files follow the umask
        with open(tmp, "rb+") as handle:  # flush the data before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return atomic_write(path, lambda tmp: tmp.write_bytes(bytes(data)))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` (without its index) as parquet at ``path`` atomically."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 130) -> Path:
    """Save a matplotlib figure atomically (format from the suffix).

    A figure with a layout engine (constrained layout) already fits its canvas; the tight
    bounding box is used only without one, because it draws the figure a second time.
    """
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    tight = None if fig.get_layout_engine() is not None else "tight"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi,
                                                      bbox_inches=tight))


def validate_frame(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Return ``df`` if it has all ``columns``; otherwise ``ValueError`` naming the missing ones."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"table is missing column(s) {missing}; it has {list(df.columns)}")
    return df


def load_run(run_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Read a run directory's tables: ``{"results": ..., "traces": ..., "samples": ...}``.

    ``results`` is always present; ``traces`` / ``samples`` only when their files exist.
    Raises ``ValueError`` naming what is missing when ``run_dir`` is not a loopscope run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist")
    if not (run_dir / "results.parquet").is_file():
        present = sorted(p.name for p in run_dir.iterdir())[:10]
        raise ValueError(f"{str(run_dir)!r} is not a loopscope run: results.parquet is missing "
                         f"(expected results.parquet and optionally traces.parquet, "
                         f"samples.parquet; found {present})")
    tables = {}
    for name in TABLES:
        file = run_dir / f"{name}.parquet"
        if file.is_file():
            tables[name] = pd.read_parquet(file)
    return tables


def job_dirs(sweep_dir: str | os.PathLike) -> list[Path]:
    """Job subdirectories of a Hydra multirun (those holding ``.hydra/``), numerically sorted."""
    sweep_dir = Path(sweep_dir)
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def expected_jobs(sweep_dir: str | os.PathLike) -> int | None:
    """How many jobs the sweep in ``multirun.yaml`` launches (the cartesian product of its sweep
    overrides, as Hydra's basic sweeper runs them); None when that cannot be read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.load(Path(sweep_dir) / "multirun.yaml")
        overrides = list(OmegaConf.select(saved, "hydra.overrides.task") or [])
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # absent, unreadable, or an override this version cannot parse
        return None
    count = 1
    for override in parsed:
        if override.is_sweep_override():
            count *= len(list(override.sweep_string_iterator()))
    return count


def collect(sweep_dir: str | os.PathLike, table: str = "results"
            ) -> tuple[pd.DataFrame, list[str]]:
    """Concatenate ``<table>.parquet`` of every job in a multirun, with a ``job`` column.

    Never fails on a partial sweep: jobs without the file (unfinished, crashed), with an
    unreadable one, or never started (counted from the sweep in ``multirun.yaml``) are returned
    by name in ``missing``.

    Returns:
        ``(frame, missing)``; ``frame`` is empty (schema columns + ``job``) when no job finished.
    """
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; allowed: {', '.join(TABLES)}")
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep directory {str(sweep_dir)!r} does not exist")
    jobs = job_dirs(sweep_dir)
    if not jobs and not (sweep_dir / "multirun.yaml").is_file():
        raise ValueError(f"{str(sweep_dir)!r} is not a Hydra multirun: no multirun.yaml and no "
                         "job subdirectories with a .hydra/ folder")
    frames, missing = [], []
    for job in jobs:
        file = job / f"{table}.parquet"
        try:
            frame = pd.read_parquet(file)
        except (OSError, ValueError):  # absent, truncated or not parquet
            missing.append(job.name)
            continue
        frames.append(frame.assign(job=job.name))
    started = {job.name for job in jobs}
    missing += [str(n) for n in range(expected_jobs(sweep_dir) or 0) if str(n) not in started]
    if not frames:
        columns = RESULTS_COLUMNS if table == "results" else []
        return pd.DataFrame(columns=[*columns, "job"]), missing
    return pd.concat(frames, ignore_index=True), missing
