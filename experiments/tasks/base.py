"""Tasks: token data generated from a seed or read from this machine (nothing is downloaded).

Every task has a difficulty knob and three splits that never share an example:

* ``train`` and ``val`` are drawn from the same distribution; an example belongs to ``val`` exactly
  when a fixed content hash of its input tokens falls below ``val_fraction`` (rejection sampling).
  Membership is a function of the content, so the two splits are disjoint by construction — no
  collision probability to argue about — whatever generator the caller passes.
* ``hard`` holds strictly longer inputs (more bits, digits, permutations or hops) than training,
  to measure extrapolation with extra loops; it is disjoint from the others by length.
* ``pycode`` splits by file instead: a hash of each file's relative path picks its split.

Vocabularies are small; every task reserves a ``pad_id`` and a ``halt_token_id`` so that the
halt-token controller works on any of them. Each task lives in its own module of this package
(``parity``, ``parity_vector``, ``addition``, ``s5``, ``phop``, ``pycode``), whose docstring
describes it, and registers itself in ``TASKS``; ``experiments.tasks`` imports them all.

Example:
    >>> task = build_task("parity", max_len=8)
    >>> batch = task.batch("train", 4, torch.Generator().manual_seed(0))
    >>> batch.tokens.shape[1] <= task.seq_len
    True
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
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


def _targets_mode(task: str, targets: str) -> str:
    if targets not in ("all", "last"):
        raise ValueError(f"task {task!r}: targets must be 'all' or 'last', got {targets!r}")
    return targets
