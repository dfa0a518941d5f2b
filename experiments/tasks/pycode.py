"""The ``pycode`` task.

Byte-level language modelling over the running Python's standard library ``.py`` files; metric
bits per byte = mean cross-entropy / ln 2.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from common.constants import SPLITS
from experiments.tasks.base import (
    TASKS,
    Batch,
    Task,
    _int_range,
)

_CORPUS_CACHE: dict[tuple[str, int, float, float], dict[str, Tensor]] = {}


def _path_fraction(relative_path: str, salt: str = "") -> float:
    digest = hashlib.sha1((salt + relative_path).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stdlib_files(root: str | os.PathLike, max_bytes: int) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of ``.py`` files under ``root``, up to ``max_bytes`` in total.

    Files are taken in the order of a hash of their relative path (stable across machines), so a
    byte cap samples the whole library instead of its alphabetical head. ``site-packages`` and
    ``__pycache__`` are skipped (they are not the standard library).
    """
    root = Path(root)
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    # a salted hash: the order must be independent of the split hash, or the cap picks one split
    found.sort(key=lambda item: (_path_fraction(item[0], salt="order:"), item[0]))
    chosen, used = [], 0
    for rel, path in found:
        if used >= max_bytes:
            break
        chosen.append((rel, path))
        used += path.stat().st_size
    return chosen


def _bytes_tensor(data: bytes) -> Tensor:
    if not data:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def split_of_path(relative_path: str, val_fraction: float, hard_fraction: float) -> str:
    """The split a file belongs to, from a SHA-1 of its relative path (stable across machines)."""
    u = _path_fraction(relative_path)
    if u < val_fraction:
        return "val"
    if u < val_fraction + hard_fraction:
        return "hard"
    return "train"


@TASKS.register("pycode")
class PyCodeTask(Task):
    """Byte-level LM on the standard library's ``.py`` files; windows of ``seq_len`` bytes.

    Tokens: bytes 0..255, 256 pad, 257 halt. ``hard`` uses windows ``hard_seq_len`` long from its
    own held-out files. Difficulty = indentation depth (leading spaces // 4) of the window's last
    line, a proxy for syntactic nesting.
    """

    def __init__(self, seq_len: int = 64, hard_seq_len: int | None = None,
                 max_bytes: int = 4_000_000, val_fraction: float = 0.1,
                 hard_fraction: float = 0.1, root: str | None = None) -> None:
        self.name, self.vocab_size, self.pad_id, self.halt_token_id = "pycode", 258, 256, 257
        self.metric = "bits_per_byte"
        hard_seq_len = 2 * seq_len if hard_seq_len is None else hard_seq_len
        _int_range(self.name, "seq_len", seq_len, "hard_seq_len", hard_seq_len, 2)
        if hard_seq_len <= seq_len:
            raise ValueError(f"hard_seq_len={hard_seq_len} must exceed seq_len={seq_len}")
        if not isinstance(max_bytes, int) or max_bytes < 1024:
            raise ValueError(f"max_bytes must be an integer >= 1024, got {max_bytes!r}")
        fractions_ok = 0 < val_fraction and 0 < hard_fraction and val_fraction + hard_fraction < 1
        if not fractions_ok:
            raise ValueError(f"val_fraction={val_fraction} and hard_fraction={hard_fraction} must "
                             "be > 0 with a sum < 1")
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise ValueError(f"pycode root {str(self.root)!r} is not a directory")
        self.train_len, self.seq_len = seq_len, hard_seq_len
        self.val_fraction, self.hard_fraction = val_fraction, hard_fraction
        self.max_bytes = max_bytes
        self.corpus = self._load()

    def _load(self) -> dict[str, Tensor]:
        key = (str(self.root), self.max_bytes, self.val_fraction, self.hard_fraction)
        if key not in _CORPUS_CACHE:
            parts: dict[str, list[bytes]] = {split: [] for split in SPLITS}
            for rel, path in stdlib_files(self.root, self.max_bytes):
                split = split_of_path(rel, self.val_fraction, self.hard_fraction)
                parts[split].append(path.read_bytes() + b"\n\n")
            _CORPUS_CACHE[key] = {
                split: _bytes_tensor(b"".join(chunks)) for split, chunks in parts.items()
            }
        corpus = _CORPUS_CACHE[key]
        for split in SPLITS:
            if corpus[split].numel() <= 2 * self.seq_len + 1:
                raise ValueError(f"pycode: split {split!r} has only {corpus[split].numel()} bytes "
                                 f"under {self.root} (max_bytes={self.max_bytes}); raise max_bytes")
        return corpus

    def files_by_split(self) -> dict[str, list[str]]:
        """Relative paths of the files read, grouped by split."""
        out: dict[str, list[str]] = {split: [] for split in SPLITS}
        for rel, _ in stdlib_files(self.root, self.max_bytes):
            out[split_of_path(rel, self.val_fraction, self.hard_fraction)].append(rel)
        return out

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        self._check_split(split, batch_size)
        data = self.corpus[split]
        length = self.seq_len if split == "hard" else self.train_len
        starts = torch.randint(0, data.numel() - length - 1, (batch_size,), generator=generator)
        index = starts[:, None] + torch.arange(length + 1)[None, :]  # (B, L+1)
        window = data[index]
        return Batch(window[:, :-1].clone(), window[:, 1:].clone(), _indent_depth(window[:, :-1]))


def _indent_depth(tokens: Tensor) -> Tensor:
    """Leading spaces // 4 of the last line in each row (0 when the line start is not visible)."""
    newline = ord("\n")
    depths = []
    for row in tokens.tolist():
        try:
            start = len(row) - row[::-1].index(newline)
        except ValueError:
            depths.append(0)
            continue
        spaces = 0
        while start + spaces < len(row) and row[start + spaces] == ord(" "):
            spaces += 1
        depths.append(spaces // 4)
    return torch.tensor(depths, dtype=torch.long)
