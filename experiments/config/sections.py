"""Typed settings of a study: the one source of the defaults of ``train``, ``eval`` and ``study``.

Each field has its default, its docstring and the range it must lie in (``setting``'s metadata);
``experiments.config.validate`` derives its checks from these fields, and
``experiments.config.store`` hands the defaults to Hydra, so ``conf/*.yaml`` only override them.
The ``model``, ``task`` and controller sections stay open-ended (their owners validate them).

Example:
    >>> TrainConfig().steps
    300
    >>> field_check(TrainConfig, "steps").allowed
    'an integer >= 1'
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.constants import GRANULARITIES, SPLITS

INF = float("inf")
# torch.manual_seed takes < 2**64; evaluation seeds derive seed * 7_919 + 103, job seeds mod 2**31-1
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Check:
    """The range a setting must lie in, read by the validator together with the field's type.

    Attributes:
        low, high: bounds of an int/float (or of every item of a list of ints); ``None`` = none.
        low_open, high_open: exclude the bound itself.
        choices: the allowed strings (or list items).
        non_empty: a list or string must not be empty.
        test: an extra predicate on the value.
        allowed: what the error message says is allowed; derived from the above when empty.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    non_empty: bool = False
    test: Callable[[Any], bool] | None = None
    allowed: str = ""


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
            **check: Any) -> Any:
    """A dataclass field with its default and the ``Check`` its value must pass."""
    meta = {"check": Check(**check)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _device_ok(name: str) -> bool:
    return name in ("auto", "cpu") or name.split(":")[0] in ("cuda", "mps")


@dataclass
class RunConfig:
    """Top-level keys of a run."""

    seed: int = setting(0, low=0, high=MAX_SEED)
    """Base seed; multirun job n uses a seed derived from (seed, n)."""
    threads: int = setting(1, low=0)
    """``torch.set_num_threads`` (tiny models: 1 is fastest); 0 = torch's default."""
    out_dir: str | None = setting(None, allowed="null or a path")
    """Run directory; null = Hydra's output directory."""


@dataclass
class TrainConfig:
    """How every planned model is trained (``experiments.train``)."""

    steps: int = setting(300, low=1)
    """Optimizer steps per model."""
    batch_size: int = setting(64, low=1)
    """Training samples per step (split across ranks under torchrun)."""
    lr: float = setting(0.002, low=0, high=INF, low_open=True, high_open=True)
    """Peak AdamW learning rate; 3e-3 made some parity runs collapse to chance."""
    weight_decay: float = setting(0.01, low=0, high=INF)
    """AdamW weight decay."""
    beta1: float = setting(0.9, low=0, high=1, high_open=True)
    """AdamW first-moment decay."""
    beta2: float = setting(0.99, low=0, high=1, high_open=True)
    """AdamW second-moment decay."""
    warmup_steps: int = setting(30, low=0)
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = setting(0.1, low=0, high=1)
    """The cosine decays to ``lr * min_lr_ratio``."""
    grad_clip: float = setting(1.0, low=0, high=INF)
    """Gradient-norm clip (0 = none)."""
    eval_every: int = setting(100, low=0)
    """Validation loss every N steps (0 = only at the end)."""
    eval_batch_size: int = setting(128, low=1)
    """Samples of that validation loss."""
    checkpoint_every: int = setting(100, low=0)
    """Checkpoint every N steps (0 = only the final checkpoint)."""
    granularity: str = setting("sample", choices=GRANULARITIES)
    """Halting granularity of learned objectives: ``sample`` or ``token``."""
    random_depth: bool = setting(False)
    """Huginn randomised depth (fixed objective only)."""
    random_depth_sigma: float = setting(0.5, low=0, high=INF, low_open=True)
    """Log-normal sigma of that randomised depth."""
    grad_steps: int | None = setting(None, low=1)
    """Truncated backprop through the last N loops (null = all)."""
    device: str = setting("auto", test=_device_ok, allowed="auto, cpu, cuda or cuda:N")
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``."""
    progress: bool = setting(True)
    """Show a progress bar."""
    workers: int = setting(1, low=1)
    """Train, then evaluate, independent models in this many processes (CPU only); the figures
    are drawn by as many processes."""


@dataclass
class EvalConfig:
    """How every trained model is evaluated (``experiments.evaluate``)."""

    batch_size: int = setting(256, low=1)
    """Samples per evaluation split (one seeded batch; each distinct example scored once)."""
    splits: list[str] = setting(factory=lambda: ["val", "hard"], choices=SPLITS, non_empty=True)
    """Splits evaluated."""
    unroll: int = setting(16, low=1)
    """The fixed sweep runs loops 1..max(unroll, 4 x training depth)."""
    verdict_loops: int = setting(32, low=7)
    """Trajectory length K classified by ``fixedpoint.classify`` (it needs K + 1 >= 8 states)."""
    budgets: list[int] = setting(factory=lambda: [4, 16], low=1, non_empty=True)
    """``max_loops`` budgets of the adaptive controllers."""
    granularity: str = setting("sample", choices=GRANULARITIES)
    """Halting granularity of the evaluated controllers: ``sample`` or ``token``."""
    controllers: dict[str, Any] = setting(factory=dict,
                                          allowed="a mapping name -> controller config")
    """Name -> controller config, run on every trained model."""
    spectral_samples: int = setting(8, low=0)
    """Samples whose spectral radius at the final state is estimated."""
    spectral_iters: int = setting(20, low=2)
    """Power iterations of that estimate (it averages the growth of the last iters // 2)."""
    attention_samples: int = setting(16, low=0)
    """Samples with captured attention for the per-loop diagnostics (0 = none)."""
    trace_samples: int = setting(8, low=0)
    """Samples whose per-token traces are stored."""
    figures: bool = setting(True)
    """Draw the figures (``experiments.figures.draw_all``) after evaluation."""
    decode_tokens: int = setting(16, low=0)
    """New tokens of the decode-latency timing (``experiments.evaluate.decode``: greedy cached
    ``generate`` of every trained model at its loop count, written to ``decode.json``, never to
    the results tables); 0 = not timed."""
    decode_batch: int = setting(8, low=1)
    """Val prompts decoded together in that timing."""


@dataclass
class StudyConfig:
    """Which models a study trains (see ``conf/config.yaml``)."""

    name: str = setting("single", non_empty=True)
    """Study name; names the output directory."""
    models: dict[str, Any] = setting(factory=dict,
                                     allowed="a mapping architecture name -> model config")
    """Architecture name -> model config (empty = just ``model``)."""
    train_loops: list[int] = setting(factory=list, low=1)
    """Loop counts trained with the fixed objective (empty = ``controller.loops``)."""
    learned: dict[str, Any] = setting(factory=dict,
                                      allowed="a mapping name -> learned controller config")
    """Name -> learned controller config; one model each, trained at ``max_loops``."""
    max_loops: int = setting(4, low=1)
    """Loop cap of learned-halting training."""


SECTIONS: dict[str, type] = {"train": TrainConfig, "eval": EvalConfig, "study": StudyConfig}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of a settings dataclass."""
    return typing.get_type_hints(cls)


def field_check(cls: type, name: str) -> Check:
    """The ``Check`` declared on field ``name`` of ``cls`` (an empty one if none)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("check", Check())
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def defaults(cls: type) -> dict[str, Any]:
    """The defaults of a settings dataclass as a plain dict (what Hydra composes from)."""
    return dataclasses.asdict(cls())
