"""Training-free controllers: ``fixed`` loop count and zero-shot ``convergence`` exits.

Convergence criteria follow Huginn (Geiping et al. 2025, arXiv 2502.05171; seal-rg/
recurrent-pretraining ``raven_modeling_minimal.py``), whose defaults are ours (REFERENCE.md §2):

=============  ==========================================================  =========  ========
criterion      value per token at loop k (passes when value < threshold)   threshold  patience
=============  ==========================================================  =========  ========
residual       ||z_k - z_{k-1}|| / ||z_k||                                 0.03       1
kl             KL(p_{k-1} || p_k) = sum p_{k-1} (log p_{k-1} - log p_k)     1e-3       1
entropy        |H(p_k) - H(p_{k-1})|                                        1e-3       1
cosine         1 - cos(z_k, z_{k-1})                                        1e-3       1
argmax         1 if argmax p_k != argmax p_{k-1} else 0                     0.5        5
acceleration   ||D_k - D_{k-1}|| / ||z_k||,  D_k = z_k - z_{k-1}           0.03       2
=============  ==========================================================  =========  ========

The KL direction is Huginn's: ``F.kl_div(log p_k, log p_{k-1}, log_target=True)`` =
KL(p_{k-1} || p_k), the previous distribution as the reference. ``argmax`` with patience 5 is
"argmax unchanged for 5 consecutive steps". ``acceleration`` (arXiv 2509.23314, secondary source)
uses the two-hit rule: below threshold on two consecutive checks; its threshold is our choice
[inferred]. A unit stops once ``patience`` consecutive checks pass (checks every ``check_every``
loops, never before ``min_loops``).

Each criterion declares the range of its value (``Criterion.high``): ``argmax`` is 0 or 1 and
``cosine`` lies in [0, 2], so a threshold above that bound could never fail — a disguised fixed exit
— and is refused. "Unchanged for N loops" is ``patience=N``, not a threshold.

At sample granularity the per-token values are reduced over the sample's tokens with ``reduce``:
``max`` (default: the sample stops when its least-converged token has converged) or ``mean``.
At token granularity each token decides for itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from common.registry import Registry
from halting.base import (
    CONTROLLERS,
    Capabilities,
    LoopController,
    RunState,
    StepView,
    check_choice,
    check_range,
)


class Criterion(NamedTuple):
    """A convergence criterion: its value per token and the defaults that go with it.

    Attributes:
        value: ``value(view, state) -> (n, T)`` float, ``inf`` where not yet defined; it may keep
            the previous step's tensors in ``state`` (``RunState.swap``).
        threshold: default threshold (passes when ``value < threshold``).
        patience: default number of consecutive passing checks.
        high: the largest threshold that can still fail: the value never exceeds it once
            defined (``inf`` when unbounded), so a threshold above it is refused.
        meaning: the value's range in words (for that refusal's message).
    """

    value: Callable[[StepView, RunState], Tensor]
    threshold: float
    patience: int
    high: float = math.inf
    meaning: str = "unbounded"


CRITERIA: Registry[Criterion] = Registry("convergence criterion")


@CONTROLLERS.register("fixed")
class FixedLoops(LoopController):
    """Exactly ``loops`` loops for every row (``None``: run_loop's ``max_loops``).

    ``run_loop(model, x, FixedLoops(k), max_loops=k).logits`` equals ``model(x, loops=k)``.
    """

    name = "fixed"
    capabilities = Capabilities(static=True)

    def __init__(self, loops: int | None = None) -> None:
        super().__init__()
        if loops is not None:
            check_range("fixed: loops", loops, 1, float("inf"), integer=True)
        self.loops = loops

    def planned_loops(self, max_loops: int) -> int:
        if self.loops is None:
            return max_loops
        if self.loops > max_loops:
            raise ValueError(f"fixed: loops={self.loops} exceeds max_loops={max_loops}; "
                             "raise max_loops or lower loops")
        return self.loops

    def hparams(self) -> dict[str, Any]:
        return {"loops": self.loops}


def _inf_like(view: StepView) -> Tensor:
    return torch.full(view.z.shape[:2], float("inf"), device=view.z.device)


def _residual(view: StepView, state: RunState) -> Tensor:
    return view.token_residual()


def _kl(view: StepView, state: RunState) -> Tensor:
    log_p = view.log_probs().detach()
    log_prev = state.swap("log_probs", view.rows, log_p)
    if log_prev is None:
        return _inf_like(view)
    return (log_prev.exp() * (log_prev - log_p)).sum(dim=-1)  # KL(p_{k-1} || p_k)


def _entropy(view: StepView, state: RunState) -> Tensor:
    log_p = view.log_probs().detach()
    entropy = -(log_p.exp() * log_p).sum(dim=-1)  # (n, T)
    previous = state.swap("entropy", view.rows, entropy)
    return _inf_like(view) if previous is None else (entropy - previous).abs()


def _cosine(view: StepView, state: RunState) -> Tensor:
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(view.z.float(), view.z_prev.float(), dim=-1)
    return 1.0 - cos


def _argmax(view: StepView, state: RunState) -> Tensor:
    top = view.logits().detach().argmax(dim=-1)  # (n, T)
    previous = state.swap("argmax", view.rows, top)
    if previous is None:
        return _inf_like(view)
    return (top != previous).float()


def _acceleration(view: StepView, state: RunState) -> Tensor:
    with torch.no_grad():
        delta = (view.z - view.z_prev).float()  # (n, T, D)
        previous = state.swap("delta", view.rows, delta)
        if previous is None:
            return _inf_like(view)
        return (delta - previous).norm(dim=-1) / view.z.float().norm(dim=-1).clamp_min(1e-12)


CRITERIA.register("residual", Criterion(_residual, 0.03, 1))
CRITERIA.register("kl", Criterion(_kl, 1e-3, 1))
CRITERIA.register("entropy", Criterion(_entropy, 1e-3, 1))
CRITERIA.register("cosine", Criterion(_cosine, 1e-3, 1, 2.0, "1 - cos, in [0, 2]"))
CRITERIA.register("argmax", Criterion(
    _argmax, 0.5, 5, 1.0, "0 or 1 (the top token changed); for 'unchanged for N loops' set "
    "patience=N"))
CRITERIA.register("acceleration", Criterion(_acceleration, 0.03, 2))


@CONTROLLERS.register("convergence")
class ConvergenceExit(LoopController):
    """Stop a unit once its convergence criterion passes ``patience`` consecutive checks.

    Args:
        criterion: one of ``residual``, ``kl``, ``entropy``, ``cosine``, ``argmax``,
            ``acceleration``.
        threshold: passes when the value is below it (default: Huginn's, see module docstring).
        min_loops: never stop before this many loops.
        check_every: check every this many loops.
        patience: consecutive passing checks needed (default per criterion).
        reduce: ``max`` or ``mean`` over a sample's tokens at sample granularity.
    """

    name = "convergence"

    def __init__(self, criterion: str = "kl", threshold: float | None = None, min_loops: int = 1,
                 check_every: int = 1, patience: int | None = None, reduce: str = "max") -> None:
        super().__init__()
        spec = CRITERIA.get(criterion)
        self.value_fn, self.criterion = spec.value, criterion
        self.threshold = spec.threshold if threshold is None else threshold
        self.patience = spec.patience if patience is None else patience
        check_range("convergence: threshold", self.threshold, 0.0, float("inf"), low_open=True,
                    high_open=True)
        if self.threshold > spec.high:
            raise ValueError(f"convergence: threshold={self.threshold!r} can never fail for "
                             f"criterion {criterion!r}, whose value is {spec.meaning}; use a "
                             f"threshold in (0, {spec.high:g}]")
        check_range("convergence: min_loops", min_loops, 1, float("inf"), integer=True)
        check_range("convergence: check_every", check_every, 1, float("inf"), integer=True)
        check_range("convergence: patience", self.patience, 1, float("inf"), integer=True)
        check_choice("convergence: reduce", reduce, ("max", "mean"))
        self._min_loops, self.check_every, self.reduce = min_loops, check_every, reduce

    def min_loops(self) -> int:
        return self._min_loops

    def decide(self, view: StepView) -> Tensor | None:
        value = self.value_fn(view, self.run).nan_to_num(nan=float("inf"))  # (n, T)
        if view.granularity == "sample":
            value = value.amax(dim=1) if self.reduce == "max" else value.mean(dim=1)
        view.log(self.criterion, value)
        if view.loops % self.check_every:
            return None
        streak = self.run.buffer("streak", dtype=torch.long)
        passed = value < self.threshold
        updated = torch.where(passed, streak[view.rows] + 1, 0)
        streak[view.rows] = updated
        return updated >= self.patience

    def hparams(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "threshold": self.threshold,
                "min_loops": self._min_loops, "check_every": self.check_every,
                "patience": self.patience, "reduce": self.reduce}
