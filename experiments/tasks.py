"""Tasks: token data generated from a seed or read from this machine (nothing is downloaded).

Every task has a difficulty knob and three splits that never share an example:

* ``train`` and ``val`` are drawn from the same distribution; an example belongs to ``val`` exactly
  when a fixed content hash of its input tokens falls below ``val_fraction`` (rejection sampling).
  Membership is a function of the content, so the two splits are disjoint by construction — no
  collision probability to argue about — whatever generator the caller passes.
* ``hard`` holds strictly longer inputs (more bits, digits, permutations or hops) than training,
  to measure extrapolation with extra loops; it is disjoint from the others by length.
* ``pycode`` splits by file instead: a hash of each file's relative path picks its split.

Tasks (vocabularies are small; every task reserves ``pad_id`` and a ``halt_token_id`` so the
``halt_token`` controller can read a halting probability from the LM head):

* ``parity`` — bits, then ``=``; the target at ``=`` is the parity (difficulty = length); with
  ``targets="all"`` every bit also gets its prefix parity. Parity is the standard ACT / PonderNet
  halting benchmark (Graves 2016; Banino et al. 2021). Its space is small (508 strings of length
  2..8), so ``val`` strings are exactly the ones training never shows: memorising fails there.
* ``addition`` — two n-digit numbers, least significant digit first, then n+1 answer slots whose
  targets are the sum's digits, also reversed (difficulty = n). Reversed-digit addition follows
  Lee et al. 2023, "Teaching arithmetic to small transformers"; answers fill placeholder slots
  instead of teacher forcing, so no answer digit is visible to the model.
* ``s5`` — a sequence of permutations of 5 elements (120 tokens); the target at every position is
  the running composition (state tracking; Liu et al. 2023 "Transformers learn shortcuts to
  automata"; Merrill et al. 2024 "The illusion of state"); difficulty = length; ``degree=3``
  gives the smaller non-abelian group S3.
* ``phop`` — p-hop induction over explicit pointers (Sanford, Hsu & Telgarsky 2024, "Transformers,
  parallel computation and logarithmic depth"): the context lists pairs ``a b`` meaning a -> b (a
  random permutation of m symbols), then ``SEP s`` and p ``HOP`` tokens; the target at the j-th
  ``HOP`` is f^j(s), so position j needs j chained look-ups (difficulty = p).
* ``pycode`` — byte-level language modelling over the running Python's standard library ``.py``
  files; metric bits per byte = mean cross-entropy / ln 2.

Example:
    >>> task = build_task("parity", max_len=8)
    >>> batch = task.batch("train", 4, torch.Generator().manual_seed(0))
    >>> batch.tokens.shape[1] <= task.seq_len
    True
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from common.constants import IGNORE_INDEX, SPLITS
from common.registry import Registry

IGNORE = IGNORE_INDEX
TASKS: Registry[type] = Registry("task")
# Fixed weights of the content hash; independent of any caller's generator so split membership
# is a property of the example itself.
_HASH_PRIME = 2_147_483_647  # 2^31 - 1
_HASH_MAX_LEN = 4096


@dataclass
class Batch:
    """One batch of a task.

    Attributes:
        tokens: (B, T) int64 input ids (right-padded with the task's ``pad_id``).
        targets: (B, T) int64 target ids; ``-100`` marks positions without a target.
        difficulty: (B,) int64 difficulty of each sample (length, digits, hops, ...).
    """

    tokens: Tensor
    targets: Tensor
    difficulty: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device), self.targets.to(device), self.difficulty.to(device))

    def __len__(self) -> int:
        return self.tokens.shape[0]


def build_task(name: str, **params: Any) -> Task:
    """Build the task registered as ``name`` (``KeyError`` lists the known names).

    Unknown or invalid parameters raise ``ValueError`` naming the bad value and what is allowed.
    """
    cls = TASKS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r}: unknown parameter(s) {unknown}; accepted: {accepted}")
    return cls(**params)


def row_hash_fraction(tokens: Tensor, pad_id: int) -> Tensor:
    """A deterministic content hash of each row mapped to [0, 1); padding does not count.

    Linear hash with fixed pseudo-random weights modulo 2^31 - 1 (a universal-hash family), so
    rows of different content land in independent-looking buckets.
    """
    if tokens.shape[1] > _HASH_MAX_LEN:
        raise ValueError(f"rows longer than {_HASH_MAX_LEN} tokens cannot be hashed")
    weights = torch.randint(
        1, _HASH_PRIME, (_HASH_MAX_LEN,), generator=torch.Generator().manual_seed(0x5EED)
    )[: tokens.shape[1]]
    values = torch.where(tokens == pad_id, 0, tokens.long().cpu() + 1)
    # values < 2^12 and weights < 2^31: each product < 2^43, a sum of 4096 < 2^55 (no overflow)
    hashed = (values * weights).sum(dim=1) % _HASH_PRIME
    return hashed.double() / _HASH_PRIME


class Task:
    """Base class. Subclasses set the attributes below and implement ``batch``.

    Attributes:
        name: registry name.
        vocab_size: number of token ids (inputs and targets are in ``0 .. vocab_size-1``).
        seq_len: the longest sequence over all splits, so a model can be built for ``hard``.
        pad_id: id of padding (never a target).
        halt_token_id: reserved id the ``halt_token`` controller reads (never an input or target).
        metric: ``accuracy`` or ``bits_per_byte``.
    """

    name: str
    vocab_size: int
    seq_len: int
    pad_id: int
    halt_token_id: int
    metric: str = "accuracy"

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """Draw ``batch_size`` samples of ``split`` (``train``, ``val`` or ``hard``)."""
        raise NotImplementedError

    def score(self, logits: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Per-sample scores of ``logits`` (B, T, V) against ``batch.targets``.

        Returns:
            ``correct`` (B,) bool — every target position predicted right; ``loss`` (B,) — mean
            cross-entropy over the sample's target positions; for ``bits_per_byte`` tasks also
            ``bits_per_byte`` (B,) = loss / ln 2.
        """
        targets = batch.targets.to(logits.device)
        if logits.shape[:2] != targets.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}"
            )
        mask = targets != IGNORE
        ce = F.cross_entropy(
            logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        )  # (B, T)
        count = mask.sum(dim=1).clamp(min=1)
        loss = ce.sum(dim=1) / count
        right = (logits.argmax(dim=-1) == targets) | ~mask
        out = {"correct": right.all(dim=1), "loss": loss}
        if self.metric == "bits_per_byte":
            out["bits_per_byte"] = loss / math.log(2)
        return out

    def _check_split(self, split: str, batch_size: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _ranges(task: str, knob: str, values: tuple[int, int, int | None, int | None],
            hard_span: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate (min, max, hard_min, hard_max) of a difficulty ``knob``; the hard split defaults to
    ``max+1 .. 2*max`` (or ``max+hard_span``) and must start above the training maximum."""
    low, high, hard_low, hard_high = values
    _int_range(task, f"min_{knob}", low, f"max_{knob}", high, 1)
    hard_low = high + 1 if hard_low is None else hard_low
    hard_high = (high + hard_span if hard_span else 2 * high) if hard_high is None else hard_high
    _int_range(task, f"hard_min_{knob}", hard_low, f"hard_max_{knob}", hard_high, 1)
    if hard_low <= high:
        raise ValueError(f"task {task!r}: hard_min_{knob}={hard_low} must exceed "
                         f"max_{knob}={high} (the hard split holds longer inputs)")
    return (low, high), (hard_low, hard_high)


def _int_range(task: str, low_name: str, low: int, high_name: str, high: int, floor: int) -> None:
    for name, value in ((low_name, low), (high_name, high)):
        if not isinstance(value, int) or isinstance(value, bool) or value < floor:
            raise ValueError(f"task {task!r}: {name} must be an integer >= {floor}, got {value!r}")
    if low > high:
        raise ValueError(f"task {task!r}: {low_name}={low} must be <= {high_name}={high}")


class GeneratedTask(Task):
    """A task whose samples come from ``_draw``; train/val split by content hash, hard by length.

    Subclasses implement ``_draw(n, low, high, generator) -> Batch`` drawing difficulties
    uniformly in ``[low, high]``, and set ``train_range``/``hard_range``.
    """

    train_range: tuple[int, int]
    hard_range: tuple[int, int]
    val_fraction: float

    def _set_val_fraction(self, val_fraction: float) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"task {self.name!r}: val_fraction must be in (0, 1), got {val_fraction!r}"
            )
        self.val_fraction = float(val_fraction)

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        self._check_split(split, batch_size)
        if split == "hard":
            return self._draw(batch_size, *self.hard_range, generator)
        want_val = split == "val"
        share = self.val_fraction if want_val else 1.0 - self.val_fraction
        kept: list[Batch] = []
        total = 0
        for _ in range(1000):
            draw = max(16, math.ceil(1.3 * (batch_size - total) / share))
            cand = self._draw(draw, *self.train_range, generator)
            is_val = row_hash_fraction(cand.tokens, self.pad_id) < self.val_fraction
            rows = (is_val == want_val).nonzero().squeeze(1)
            kept.append(Batch(cand.tokens[rows], cand.targets[rows], cand.difficulty[rows]))
            total += rows.numel()
            if total >= batch_size:
                break
        else:
            raise RuntimeError(f"task {self.name!r}: could not fill a {split} batch")
        return Batch(*(torch.cat(parts)[:batch_size] for parts in zip(
            *((b.tokens, b.targets, b.difficulty) for b in kept))))


def _lengths(n: int, low: int, high: int, generator: torch.Generator) -> Tensor:
    return torch.randint(low, high + 1, (n,), generator=generator)  # (n,)


@TASKS.register("parity")
class ParityTask(GeneratedTask):
    """Parity of a bit string: ``b_1 .. b_n =`` -> target at ``=`` is ``b_1 xor .. xor b_n``.

    Tokens: 0 pad, 1 halt, 2/3 bits 0/1, 4 ``=``. Difficulty = n. ``targets="all"`` also
    supervises every bit position with the parity of the prefix so far (denser signal).
    """

    PAD, HALT, ZERO, ONE, EQ = 0, 1, 2, 3, 4

    def __init__(self, min_len: int = 2, max_len: int = 8, hard_min_len: int | None = None,
                 hard_max_len: int | None = None, targets: str = "last",
                 val_fraction: float = 0.1) -> None:
        self.name, self.vocab_size, self.pad_id, self.halt_token_id = "parity", 5, 0, 1
        self.train_range, self.hard_range = _ranges(
            self.name, "len", (min_len, max_len, hard_min_len, hard_max_len))
        self.targets_mode = _targets_mode(self.name, targets)
        self._set_val_fraction(val_fraction)
        self.seq_len = self.hard_range[1] + 1

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        lengths = _lengths(n, low, high, generator)  # (n,)
        bits = torch.randint(0, 2, (n, high), generator=generator)  # (n, high)
        pos = torch.arange(high + 1)
        inside = pos[:high] < lengths[:, None]  # (n, high)
        bits = bits * inside
        tokens = torch.full((n, high + 1), self.PAD)
        tokens[:, :high] = torch.where(inside, bits + self.ZERO, self.PAD)
        rows = torch.arange(n)
        tokens[rows, lengths] = self.EQ
        targets = torch.full_like(tokens, IGNORE)
        if self.targets_mode == "all":
            prefix = torch.where(inside, bits.cumsum(dim=1) % 2 + self.ZERO, IGNORE)
            targets[:, :high] = prefix
        targets[rows, lengths] = bits.sum(dim=1) % 2 + self.ZERO
        return Batch(tokens, targets, lengths)


@TASKS.register("addition")
class AdditionTask(GeneratedTask):
    """``a + b`` with n-digit operands, digits least significant first, answer in n+1 slots.

    Layout: ``a_0..a_{n-1} + b_0..b_{n-1} = ?_0..?_n``; the target at ``?_i`` is digit i of a+b.
    Tokens: 0 pad, 1 halt, 2..11 digits, 12 ``+``, 13 ``=``, 14 ``?``. Difficulty = n.
    """

    PAD, HALT, DIGIT0, PLUS, EQ, SLOT = 0, 1, 2, 12, 13, 14

    def __init__(self, min_digits: int = 1, max_digits: int = 4,
                 hard_min_digits: int | None = None, hard_max_digits: int | None = None,
                 val_fraction: float = 0.1) -> None:
        self.name, self.vocab_size, self.pad_id, self.halt_token_id = "addition", 15, 0, 1
        self.train_range, self.hard_range = _ranges(
            self.name, "digits", (min_digits, max_digits, hard_min_digits, hard_max_digits), 3)
        self._set_val_fraction(val_fraction)
        self.seq_len = 3 * self.hard_range[1] + 3

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        digits = _lengths(n, low, high, generator)  # (n,)
        a = torch.randint(0, 10, (n, high), generator=generator)  # (n, high) little-endian
        b = torch.randint(0, 10, (n, high), generator=generator)
        inside = torch.arange(high)[None, :] < digits[:, None]  # (n, high)
        a, b = a * inside, b * inside
        total = torch.zeros(n, high + 1, dtype=torch.long)  # digits of a + b, little-endian
        carry = torch.zeros(n, dtype=torch.long)
        for i in range(high):
            column = a[:, i] + b[:, i] + carry
            total[:, i], carry = column % 10, column // 10
        total[:, high] = carry  # columns past a row's own length add only its carry
        width = 3 * high + 3
        tokens = torch.full((n, width), self.PAD)
        targets = torch.full((n, width), IGNORE)
        rows = torch.arange(n)
        for i in range(high):
            live = i < digits  # (n,)
            tokens[rows[live], i] = a[live, i] + self.DIGIT0
            tokens[rows[live], digits[live] + 1 + i] = b[live, i] + self.DIGIT0
        tokens[rows, digits] = self.PLUS
        tokens[rows, 2 * digits + 1] = self.EQ
        for i in range(high + 1):
            live = i <= digits
            tokens[rows[live], 2 * digits[live] + 2 + i] = self.SLOT
            targets[rows[live], 2 * digits[live] + 2 + i] = total[live, i] + self.DIGIT0
        return Batch(tokens, targets, digits)


def _perm_tables(degree: int = 5) -> tuple[list[tuple[int, ...]], Tensor]:
    """Permutations of ``degree`` (lexicographic); ``compose[i, j]`` = index of perm_i o perm_j."""
    perms = list(itertools.permutations(range(degree)))
    index = {p: i for i, p in enumerate(perms)}
    compose = torch.tensor(
        [[index[tuple(p[q[x]] for x in range(degree))] for q in perms] for p in perms]
    )
    return perms, compose  # (degree!, degree!)


def _targets_mode(task: str, targets: str) -> str:
    if targets not in ("all", "last"):
        raise ValueError(f"task {task!r}: targets must be 'all' or 'last', got {targets!r}")
    return targets


@TASKS.register("s5")
class S5Task(GeneratedTask):
    """Compose permutations of 5 elements; the target at position t is g_t o ... o g_1.

    Tokens: 0 pad, 1 halt, 2..121 the 120 permutations (lexicographic order); targets use the same
    ids. ``targets="all"`` supervises every position, ``"last"`` only the final one.
    Difficulty = length. ``degree`` (2..6) swaps in S_degree (degree! tokens); S3 is a much
    easier non-abelian group for small models.
    """

    PAD, HALT, PERM0 = 0, 1, 2

    def __init__(self, min_len: int = 2, max_len: int = 8, hard_min_len: int | None = None,
                 hard_max_len: int | None = None, targets: str = "all", degree: int = 5,
                 val_fraction: float = 0.1) -> None:
        if degree not in range(2, 7):
            raise ValueError(f"task 's5': degree must be an integer in 2..6, got {degree!r}")
        self.compose = _perm_tables(degree)[1]
        self.n_perms = self.compose.shape[0]
        self.name, self.pad_id, self.halt_token_id = "s5", 0, 1
        self.vocab_size = self.PERM0 + self.n_perms
        self.train_range, self.hard_range = _ranges(
            self.name, "len", (min_len, max_len, hard_min_len, hard_max_len))
        self.targets_mode = _targets_mode(self.name, targets)
        self._set_val_fraction(val_fraction)
        self.seq_len = self.hard_range[1]

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        lengths = _lengths(n, low, high, generator)  # (n,)
        perms = torch.randint(0, self.n_perms, (n, high), generator=generator)  # (n, high)
        inside = torch.arange(high)[None, :] < lengths[:, None]
        state = perms[:, 0]
        running = [state]
        for t in range(1, high):
            state = self.compose[perms[:, t], state]  # g_t o state
            running.append(state)
        running_t = torch.stack(running, dim=1)  # (n, high)
        tokens = torch.where(inside, perms + self.PERM0, self.PAD)
        targets = torch.where(inside, running_t + self.PERM0, IGNORE)
        if self.targets_mode == "last":
            last = torch.arange(high)[None, :] == (lengths[:, None] - 1)
            targets = torch.where(last, targets, IGNORE)
        return Batch(tokens, targets, lengths)


@TASKS.register("phop")
class PHopTask(GeneratedTask):
    """p-hop induction: pairs ``a b`` (a -> b, a random permutation of ``n_pairs`` symbols), then
    ``SEP s HOP^p``; the target at the j-th ``HOP`` is f^j(s).

    Tokens: 0 pad, 1 halt, 2 SEP, 3 HOP, 4.. symbols. Difficulty = p (hops); ``hard`` uses more
    hops than training, hence longer inputs.
    """

    PAD, HALT, SEP, HOP, SYM0 = 0, 1, 2, 3, 4

    def __init__(self, min_hops: int = 1, max_hops: int = 4, hard_min_hops: int | None = None,
                 hard_max_hops: int | None = None, n_pairs: int = 8, n_symbols: int = 16,
                 val_fraction: float = 0.1) -> None:
        self.name, self.pad_id, self.halt_token_id = "phop", 0, 1
        self.train_range, self.hard_range = _ranges(
            self.name, "hops", (min_hops, max_hops, hard_min_hops, hard_max_hops))
        _int_range(self.name, "n_pairs", n_pairs, "n_symbols", n_symbols, 2)
        self.n_pairs, self.n_symbols = n_pairs, n_symbols
        self.vocab_size = self.SYM0 + n_symbols
        self._set_val_fraction(val_fraction)
        self.seq_len = 2 * n_pairs + 2 + self.hard_range[1]

    def _draw(self, n: int, low: int, high: int, generator: torch.Generator) -> Batch:
        m = self.n_pairs
        hops = _lengths(n, low, high, generator)  # (n,)
        symbols = torch.rand(n, self.n_symbols, generator=generator).argsort(dim=1)[:, :m]  # (n, m)
        image = torch.rand(n, m, generator=generator).argsort(dim=1)  # (n, m) a_i -> a_image[i]
        order = torch.rand(n, m, generator=generator).argsort(dim=1)  # listing order of pairs
        heads = symbols.gather(1, order)  # (n, m)
        tails = symbols.gather(1, image.gather(1, order))
        pairs = torch.stack([heads, tails], dim=2).reshape(n, 2 * m)  # (n, 2m) a b a b ...
        start = torch.randint(0, m, (n,), generator=generator)  # index into symbols
        width = 2 * m + 2 + high
        tokens = torch.full((n, width), self.PAD)
        targets = torch.full((n, width), IGNORE)
        tokens[:, : 2 * m] = pairs + self.SYM0
        tokens[:, 2 * m] = self.SEP
        tokens[:, 2 * m + 1] = symbols.gather(1, start[:, None]).squeeze(1) + self.SYM0
        current = start
        for j in range(high):
            current = image.gather(1, current[:, None]).squeeze(1)
            live = j < hops
            tokens[:, 2 * m + 2 + j] = torch.where(live, self.HOP, self.PAD)
            value = symbols.gather(1, current[:, None]).squeeze(1) + self.SYM0
            targets[:, 2 * m + 2 + j] = torch.where(live, value, IGNORE)
        return Batch(tokens, targets, hops)


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


from experiments import parity_vector  # noqa: E402,F401  registers "parity_vector" (own file)
