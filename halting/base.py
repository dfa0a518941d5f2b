"""The loop-controller protocol: ``LoopController`` with its declared ``Capabilities``.

A run (``halting.run_loop``, or any other driver: decoding, replay) talks to a controller through
three calls, in this order, once per run:

1. ``controller.begin(state)`` with a fresh ``RunState`` (batch, sequence length, cap, min loops,
   granularity, device, mode; per-unit buffers). The run owns the state; the controller reads it
   as ``controller.run`` until ``finish``.
2. ``controller.decide(view)`` after each step, with a ``StepView`` of the rows still running. It
   returns a bool tensor of the rows (sample granularity, shape (n,)) or tokens (token
   granularity, (n, T)) that stop now, or ``None`` when nothing stops (the cheap answer: no host
   synchronisation). Everything it may read is computed lazily and cached on the view (logits,
   probabilities, the model's halt logit, the relative residual), so it pays only for what it
   reads. Per-unit state lives in ``state.buffers`` indexed by ``view.rows`` (original batch
   indices), so compaction never scrambles it.
3. ``controller.finish(draft)`` with the ``LoopDraft`` (depth, traces, per-step readouts, ...):
   mixtures, training-time exits, aux tensors. A controller that declares ``provides_logits``
   sets ``draft.logits`` here; the driver then turns the draft into a complete ``LoopOutput``.

What a controller needs from the driver is declared, never probed: a frozen ``Capabilities`` on
the class (``granularities``; ``static`` — never stops a row and reads nothing, so the driver may
skip views and ``decide``; ``drives_loop`` — after loop 0 the controller runs the rest itself
through its ``drive`` method; ``step_logits`` / ``provides_logits`` — ``never``, ``train`` or
``always``). Besides the three calls a controller may override ``bind(model)`` (create heads of
the model's width), ``planned_loops(max_loops)``, ``min_loops()``, ``loss_terms(out, targets)``
and ``hparams()``.

Driving a controller from other code (e.g. token-by-token decoding)::

    training = set_run_mode(controller, model, "auto")       # halting.loop: the run's mode
    controller.bind(model)
    state = RunState(batch=B, seq_len=T, max_loops=K, granularity="sample", device=device,
                     min_loops=max(1, controller.min_loops()), training=training)
    controller.begin(state)
    for k in range(K):                                       # rows: running original indices
        z_new = model.step(z, ctx, k)
        stop = controller.decide(StepView(model, ctx, k, z_new, z, rows, "sample", None, K))
        ...                                                  # drop stopped rows, keep exits
    controller.finish(draft)                                 # only to build a LoopOutput

Modes: ``train()`` / ``eval()`` switch between a controller's training and evaluation behaviour;
``run_loop`` sets the mode per run (see ``halting.loop``, "Modes").

Training: ``controller.loss_terms(out, targets)`` returns named scalar losses whose sum is the
training loss; the trainer adds them and never branches on the controller's type.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.constants import GRANULARITIES, IGNORE_INDEX
from common.registry import Registry, call_with_known
from halting.state import LoopDraft, LoopOutput, RunState, StepView

CONTROLLERS: Registry[type[LoopController]] = Registry("controller")
WHEN = ("never", "train", "always")

__all__ = ["CONTROLLERS", "GRANULARITIES", "IGNORE_INDEX", "Capabilities", "LoopController",
           "LoopDraft", "LoopOutput", "RunState", "StepView", "build_controller", "task_loss"]


@dataclass(frozen=True)
class Capabilities:
    """What a controller class needs from the run that drives it, declared once.

    Attributes:
        granularities: the granularities it supports.
        static: ``decide`` never stops a row and reads nothing (``fixed``): the driver builds no
            views and never calls ``decide`` (a near-bare loop).
        drives_loop: after loop 0 (run by the driver on the whole batch) the controller runs the
            remaining loops itself through ``drive`` (``solver``).
        step_logits: when the driver keeps every step's readout in ``step_logits``: ``never``,
            ``train`` (in training mode only) or ``always``.
        provides_logits: when ``finish`` sets the logits itself (the driver then skips its exit
            readout): ``never``, ``train`` or ``always``.
    """

    granularities: tuple[str, ...] = GRANULARITIES
    static: bool = False
    drives_loop: bool = False
    step_logits: str = "never"
    provides_logits: str = "never"

    def __post_init__(self) -> None:
        for name in ("step_logits", "provides_logits"):
            if getattr(self, name) not in WHEN:
                raise ValueError(f"Capabilities.{name} must be one of {WHEN}, got "
                                 f"{getattr(self, name)!r}")
        if not set(self.granularities) <= set(GRANULARITIES) or not self.granularities:
            raise ValueError(f"Capabilities.granularities must be a non-empty subset of "
                             f"{GRANULARITIES}, got {self.granularities!r}")
        if self.static and self.drives_loop:
            raise ValueError("Capabilities: a controller is static or drives the loop, not both")

    def keeps_step_logits(self, training: bool) -> bool:
        return self.step_logits == "always" or (self.step_logits == "train" and training)

    def sets_logits(self, training: bool) -> bool:
        return self.provides_logits == "always" or (self.provides_logits == "train" and training)


class LoopController(nn.Module):
    """Base class of every loop controller; see the module docstring for the protocol.

    Subclasses set ``name`` (the registry key) and ``capabilities`` and override ``decide``;
    learned controllers also override ``loss_terms`` and usually ``finish``; a controller that
    declares ``drives_loop`` overrides ``drive``.
    """

    name = "base"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.capabilities.drives_loop and cls.drive is LoopController.drive:
            raise TypeError(f"{cls.__name__} declares drives_loop but does not define drive()")

    def __init__(self) -> None:
        super().__init__()
        self._state: RunState | None = None
        self.explicit_mode: bool | None = None

    @property
    def granularities(self) -> tuple[str, ...]:
        return self.capabilities.granularities

    @property
    def run(self) -> RunState:
        """The ``RunState`` of the run in progress (set by ``begin``)."""
        if self._state is None:
            raise RuntimeError(f"controller {self.name!r}: call begin(RunState) before "
                               "decide() or finish()")
        return self._state

    def train(self, mode: bool = True) -> LoopController:
        """Set the mode, remembering that it was set by hand (``run_loop`` warns when a run's
        mode disagrees with it; see ``halting.loop``)."""
        self.explicit_mode = bool(mode)
        return super().train(mode)

    # -- the protocol --------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        """Adapt to ``model`` (create heads of its width, check its vocabulary); idempotent.

        ``run_loop`` calls it first; call it yourself before building an optimiser over
        ``controller.parameters()`` (``q_halt`` creates its Q-head here unless given ``d_model``).
        """

    def planned_loops(self, max_loops: int) -> int:
        """How many steps the loop runs at most under this controller (``fixed``: its ``loops``)."""
        return max_loops

    def min_loops(self) -> int:
        """The controller's own lower bound on loops (combined with run_loop's ``min_loops``)."""
        return 1

    def begin(self, state: RunState) -> None:
        """Start a run: keep ``state`` (read as ``self.run``); subclasses reset their own here."""
        self._state = state

    def decide(self, view: StepView) -> Tensor | None:
        """Bool tensor of running rows (n,) / tokens (n, T) that stop after this step, or None."""
        return None

    def drive(self, model: nn.Module, ctx: Any, z1: Tensor, max_loops: int, record: bool) -> Any:
        """Run loops 2..``max_loops`` from loop 1's state ``z1`` (``Capabilities.drives_loop``).

        Returns a ``fixedpoint.Solution`` (``z``, per-sample ``steps``, ``evaluations``,
        ``residuals`` (B, K), ``states``).
        """
        raise NotImplementedError(f"controller {self.name!r} does not drive the loop")

    def finish(self, draft: LoopDraft) -> None:
        """Post-process the draft (mixtures, training-time exits, aux tensors); default: none."""

    def loss_terms(self, out: LoopOutput, targets: Tensor) -> dict[str, Tensor]:
        """Named scalar training losses; default ``{"task": CE of the exit logits}``."""
        terms = {"task": task_loss(out.logits, targets)}
        out.loss_terms = terms
        return terms

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments (for logging and configs)."""
        return {}

    def guard_eval_loss(self, out: LoopOutput, terms: dict[str, Tensor]) -> None:
        """Make backpropagating an evaluation-mode loss fail with a clear error.

        For controllers whose training objective exists only in training mode (learned halting):
        their evaluation-mode ``loss_terms`` is the task loss alone, so training on it would
        silently drop the halting objective. Computing (and logging) that loss stays allowed;
        ``backward`` through it raises.
        """
        if out.training:
            return
        name = self.name

        def refuse(grad: Tensor) -> Tensor:
            raise RuntimeError(
                f"{name}: backward through the loss of an evaluation-mode run "
                "(LoopOutput.training=False) would train without the halting objective (the "
                "halting head gets no gradient); train in training mode (model.train(), or "
                "run_loop(..., mode='train'))")

        for term in terms.values():
            if term.requires_grad:
                term.register_hook(refuse)

    # -- helpers -------------------------------------------------------------------------------
    def ensure_bound(self, model: nn.Module) -> None:
        """``bind``, warning when that created parameters in training mode (an optimiser built
        earlier would silently leave them untrained)."""
        before = len(list(self.parameters()))
        self.bind(model)
        if self.training and len(list(self.parameters())) != before:
            warnings.warn(f"controller {self.name!r} created parameters on its first run; an "
                          "optimiser built before this does not train them. Call "
                          "controller.bind(model) before building the optimiser.", stacklevel=3)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.hparams().items())


def task_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Token cross-entropy averaged over non-ignored targets (``-100`` = ignore)."""
    check_targets(logits, targets)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


def check_targets(logits: Tensor, targets: Tensor) -> None:
    if not isinstance(targets, Tensor) or targets.dtype != torch.long:
        got = getattr(targets, "dtype", type(targets).__name__)
        raise TypeError(f"targets must be an int64 tensor, got {got}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal (B, T) = "
                         f"{tuple(logits.shape[:2])}")


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False, integer: bool = False) -> None:
    """Raise ``ValueError`` naming ``name``, the bad value and the allowed range."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (
            not integer and not math.isfinite(value)):
        raise ValueError(f"{name} must be a{'n integer' if integer else ' finite number'}, "
                         f"got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def controller_defaults(name: str) -> dict[str, Any]:
    """``{"name": name, **every constructor parameter's default}`` of a registered controller.

    The class signature is the one place a controller's defaults live; configs (the app's
    ``controller/*.yaml``) are generated from this and only override it.
    """
    cls = CONTROLLERS.get(name)
    params = inspect.signature(cls.__init__).parameters.values()
    return {"name": name, **{p.name: p.default for p in params
                             if p.name != "self" and p.default is not inspect.Parameter.empty}}


def build_controller(name_or_cfg: str | Mapping[str, Any] | LoopController,
                     **kw: Any) -> LoopController:
    """Build a controller from a registry name or a mapping ``{"name": ..., **params}``.

    Example:
        >>> build_controller("convergence", criterion="kl", threshold=5e-4)
        >>> build_controller({"name": "pondernet", "lambda_prior": 0.2})

    Raises:
        KeyError: unknown controller name (the message lists the known ones).
        ValueError: a parameter out of range (named with the allowed range).
        TypeError: an unknown parameter.
    """
    if isinstance(name_or_cfg, LoopController):
        if kw:
            raise TypeError(f"cannot apply parameters {sorted(kw)} to an existing controller")
        return name_or_cfg
    if isinstance(name_or_cfg, Mapping):
        params = dict(name_or_cfg)
        if "name" not in params:
            raise KeyError(f"controller config needs a 'name'; known: {', '.join(CONTROLLERS)}")
        name = params.pop("name")
        params.pop("_target_", None)
        params.update(kw)
    elif isinstance(name_or_cfg, str):
        name, params = name_or_cfg, dict(kw)
    else:
        raise TypeError(f"controller must be a name or a mapping, got {type(name_or_cfg).__name__}")
    return call_with_known(CONTROLLERS.get(name), "controller", name, **params)
