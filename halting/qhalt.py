"""``q_halt``: Q-learning halting of HRM / TRM (sapientinc/HRM, SamsungSAILMontreal/
TinyRecursiveModels; REFERENCE.md §2).

A Q-head ``Linear(d, 2)`` (weights 0, bias -5, so it starts by never halting) reads the pooled
state and gives (q_halt, q_continue). Halt when ``q_halt > q_continue`` (``mode="hrm"``) or
``q_halt > 0`` (``mode="trm"``).

Pooling: HRM reads position 0, which works there because its attention is bidirectional. In our
causal models position 0 sees only the first token, so the default ``pool="last"`` reads the last
position (the only one that has seen the whole sequence); ``pool="first"`` reproduces HRM and
``"mean"`` averages the positions.

Training (one ``run_loop`` call plays HRM's sequence of deep-supervision segments): every row runs
all ``max_loops`` steps so every step's readout and Q values exist. Each sample's exit is its first
step at which the halting rule holds and which is at least its exploration minimum (with
probability ``explore`` a random minimum in [2, max_loops], HRM's ``halt_exploration_prob``; never
below ``min_loops``; at ``max_loops=1`` there is nothing to explore), else the cap. Over the steps
up to the exit the loss is, per sample and then averaged over samples:

* ``task``: the mean LM loss of those steps (deep supervision);
* ``q_halt``: 0.5 x BCE(q_halt_n, [the sample is fully correct at step n]);
* ``q_continue``: 0.5 x BCE(q_continue_n, sigmoid(max(q_halt_{n+1}, q_continue_{n+1}))) with the
  target detached; there is no next step at the cap, so the cap's step has no continue target.

Evaluation: rows leave the batch at their first halting step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from halting.base import (
    CONTROLLERS,
    IGNORE_INDEX,
    Capabilities,
    LoopController,
    LoopDraft,
    LoopOutput,
    StepView,
    check_choice,
    check_range,
)
from halting.learned import gather_exit
from halting.objectives import per_step_losses

Q_POOLS = ("last", "first", "mean")


@CONTROLLERS.register("q_halt")
class QHalt(LoopController):
    """HRM/TRM Q-halting with its own Q-head (the controller's parameters).

    Args:
        explore: probability of a random minimum depth per sample in training.
        mode: ``hrm`` (q_halt > q_continue) or ``trm`` (q_halt > 0).
        d_model: width of the state; ``None`` creates the head at ``bind(model)``.
        pool: ``last``, ``first`` or ``mean`` position of the state.
        seed: seed of the exploration generator.
    """

    name = "q_halt"
    capabilities = Capabilities(granularities=("sample",), step_logits="train",
                                provides_logits="train")

    def __init__(self, explore: float = 0.1, mode: str = "hrm", d_model: int | None = None,
                 pool: str = "last", seed: int = 0) -> None:
        super().__init__()
        check_range("q_halt: explore", explore, 0.0, 1.0)
        check_choice("q_halt: mode", mode, ("hrm", "trm"))
        check_choice("q_halt: pool", pool, Q_POOLS)
        self.explore, self.mode, self.pool, self.seed = explore, mode, pool, seed
        self.head: nn.Linear | None = None
        self._generator: torch.Generator | None = None
        if d_model is not None:
            check_range("q_halt: d_model", d_model, 1, float("inf"), integer=True)
            self._make_head(d_model)

    def _make_head(self, d_model: int, device: torch.device | None = None) -> None:
        self.head = nn.Linear(d_model, 2, device=device)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, -5.0)

    def bind(self, model: nn.Module) -> None:
        d_model = model.d_model
        if self.head is None:
            self._make_head(d_model, device=next(model.parameters()).device)
        elif self.head.in_features != d_model:
            raise ValueError(f"q_halt: head width {self.head.in_features} != model d_model "
                             f"{d_model}")

    def q_values(self, z: Tensor) -> Tensor:
        """(n, 2) float32 (q_halt, q_continue) of states z (n, T, D)."""
        if self.pool == "first":
            pooled = z[:, 0]
        elif self.pool == "last":
            pooled = z[:, -1]
        else:
            pooled = z.mean(dim=1)
        return self.head(pooled.to(self.head.weight.dtype)).float()

    def halts(self, q: Tensor) -> Tensor:
        if self.mode == "hrm":
            return q[..., 0] > q[..., 1]
        return q[..., 0] > 0

    def decide(self, view: StepView) -> Tensor | None:
        q = self.q_values(view.z)
        view.log("q_halt", q[:, 0])
        view.log("q_continue", q[:, 1])
        if self.run.training:
            self.run.append("q", q)  # every row runs: (B, 2)
            return None
        return self.halts(q.detach())

    def _exploration_minimum(self, batch: int, max_loops: int, device: torch.device) -> Tensor:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        explore = torch.rand(batch, generator=self._generator) < self.explore
        if max_loops < 2:  # HRM's random minimum lies in [2, max_loops]: nothing to explore
            return torch.ones(batch, dtype=torch.long, device=device)
        minimum = torch.randint(2, max_loops + 1, (batch,), generator=self._generator)
        return torch.where(explore, minimum, 1).to(device)

    def get_extra_state(self) -> dict[str, Any]:
        """The exploration generator's state travels with ``state_dict`` (checkpoints), so a
        resumed training run draws the same exploration depths as an uninterrupted one."""
        return {"generator": None if self._generator is None else self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("generator") if isinstance(state, dict) else None
        if saved is None:
            self._generator = None
        else:
            self._generator = torch.Generator()
            self._generator.set_state(saved)

    def finish(self, draft: LoopDraft) -> None:
        if not draft.training:
            return
        q = torch.stack(self.run.steps["q"])  # (K, B, 2)
        steps, batch = q.shape[:2]
        minimum = self._exploration_minimum(batch, steps, q.device).clamp_min(self.run.min_loops)
        loops = torch.arange(1, steps + 1, device=q.device).unsqueeze(1)  # (K, 1)
        stops = self.halts(q.detach()) & (loops >= minimum)  # (K, B)
        stops[-1] = True
        draft.depth = stops.float().argmax(dim=0) + 1
        draft.logits = gather_exit(draft.step_logits, draft.depth)
        draft.aux.update(q=q, exploration_min=minimum)

    def loss_terms(self, out: LoopOutput, targets: Tensor) -> dict[str, Tensor]:
        if not out.training or "q" not in out.aux:
            terms = super().loss_terms(out, targets)
            self.guard_eval_loss(out, terms)
            return terms
        q = out.aux["q"]  # (K, B, 2)
        steps = q.shape[0]
        lm = per_step_losses(out.step_logits, targets, "sample")  # (K, B)
        halt_target, cont_target = q_targets(out.step_logits, targets, q)
        loops = torch.arange(1, steps + 1, device=q.device).unsqueeze(1)  # (K, 1)
        used = (loops <= out.depth).float()  # (K, B) steps up to each exit
        has_next = used * (loops < steps).float()
        halt = F.binary_cross_entropy_with_logits(q[..., 0], halt_target, reduction="none")
        cont = F.binary_cross_entropy_with_logits(q[..., 1], cont_target, reduction="none")
        valid = (targets != IGNORE_INDEX).any(dim=1).float()  # (B,)

        def per_sample_mean(values: Tensor, mask: Tensor) -> Tensor:
            per_sample = (values * mask).sum(0) / mask.sum(0).clamp_min(1.0)  # (B,)
            return (per_sample * valid).sum() / valid.sum().clamp_min(1.0)

        terms = {"task": per_sample_mean(lm, used),
                 "q_halt": 0.5 * per_sample_mean(halt, used),
                 "q_continue": 0.5 * per_sample_mean(cont, has_next)}
        out.loss_terms = terms
        return terms

    def hparams(self) -> dict[str, Any]:
        return {"explore": self.explore, "mode": self.mode, "pool": self.pool, "seed": self.seed}


def q_targets(step_logits: Tensor, targets: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """HRM's Q targets per step and sample, both (K, B) and detached.

    q_halt target: 1 when every non-ignored token's argmax is right at that step.
    q_continue target: sigmoid(max(q_halt_{n+1}, q_continue_{n+1})); the last step (no next one)
    gets its own q_halt target as a placeholder (callers mask it out).
    """
    with torch.no_grad():
        counted = targets != IGNORE_INDEX  # (B, T)
        right = (step_logits.argmax(dim=-1) == targets) | ~counted  # (K, B, T)
        halt_target = right.all(dim=-1).float()  # (K, B)
        next_best = q[1:].max(dim=-1).values  # (K-1, B)
        cont_target = torch.cat([torch.sigmoid(next_best), halt_target[-1:]])
    return halt_target, cont_target
