"""Learned halting: ``act``, ``pondernet``, ``ouro_gate``, ``halt_token``.

Formulas are in ``halting.objectives`` (with their sources). Here they meet the loop:

* The halting unit is a sample (``granularity="sample"``) or a token (``"token"``). Per sample the
  model's (B, T) halt logits are pooled with ``pool``: ``last`` (default — in a causal model only
  the last position has seen the whole sequence) or ``mean``.
* **ACT** (Graves 2016) halts in training and evaluation alike (rows leave the batch at their N).
  Its output is the p-weighted sum of the per-step readouts (logits), Graves' y = sum_n p_n y^n,
  not a readout of mixed states. Before ``min_loops`` the halting unit is not consulted (h = 0).
  Loss: task CE of the mixture + ``tau`` (N + R); the ponder cost reaches the halting unit only
  through the remainder R.
* **PonderNet**, **Ouro exit gate** and **halt token** share the geometric halting distribution
  p_n = lambda_n prod_{j<n}(1 - lambda_j), lambda forced to 1 at the cap and to 0 before
  ``min_loops`` (no halting mass there, in training and evaluation). In training mode every
  row runs all ``max_loops`` steps (the expected loss needs every step's readout; ``executed``
  shows that cost) and the loss is the per-unit expectation sum_n p_n L_n plus the regulariser
  (PonderNet: + beta KL(p || truncated geometric prior); Ouro and halt token: - beta H(p)). The
  reported ``depth``/``logits`` in training are those of the evaluation rule applied to the
  trajectory. In evaluation mode rows leave the batch at their exit:

  - PonderNet ``inference="sample"``: stop with probability lambda_n (Bernoulli with the
    controller's seeded generator — lambda_n, not p_n, which lucidrains' port samples from);
    ``"threshold"``: stop once lambda_n >= threshold; ``"cdf"``: stop once the CDF of p reaches
    ``threshold`` (the same as Ouro's Q-exit).
  - Ouro and halt token: Q-exit, the first step whose CDF reaches ``q``.

* **Halt token**: lambda_n is the LM head's probability of the reserved ``halt_token_id`` at the
  new state (at token granularity per position; per sample pooled with ``pool``: the last
  position's probability, or the mean over positions). No separate head: the halt token learns
  through the expected loss (its probability is p's only parameterisation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from halting.base import (
    CONTROLLERS,
    Capabilities,
    LoopController,
    LoopDraft,
    LoopOutput,
    StepView,
    check_choice,
    check_range,
    task_loss,
)
from halting.objectives import (
    act_step,
    cdf_exit,
    expected_loss,
    geometric_halting,
    halting_entropy,
    kl_to_prior,
    per_step_losses,
    ponder_cost,
    truncated_geometric_prior,
    unit_mean,
)

POOLS = ("last", "mean")


def pool_units(values: Tensor, granularity: str, pool: str) -> Tensor:
    """(n, T) per-position values -> (n,) per sample (``last`` or ``mean``), or unchanged."""
    if granularity == "token":
        return values
    return values[:, -1] if pool == "last" else values.mean(dim=1)


def gather_exit(step_logits: Tensor, depth: Tensor) -> Tensor:
    """Readout at each unit's exit: step_logits (K, B, T, V), depth (B,) or (B, T) 1-based."""
    steps, batch, seq_len, vocab = step_logits.shape
    index = (depth - 1).view(1, batch, -1, 1).expand(1, batch, seq_len, vocab)
    return step_logits.gather(0, index).squeeze(0)  # (B, T, V)


@CONTROLLERS.register("act")
class AdaptiveComputationTime(LoopController):
    """Graves' ACT on the model's halt head: h_n = sigmoid(halt_logit).

    Args:
        eps: halt once the cumulative halting mass reaches 1 - eps (Graves: 0.01).
        tau: weight of the ponder cost N + R in the loss.
        pool: how a sample's (B, T) halt logits become one (sample granularity).
    """

    name = "act"
    capabilities = Capabilities(provides_logits="always")

    def __init__(self, eps: float = 0.01, tau: float = 0.01, pool: str = "last") -> None:
        super().__init__()
        check_range("act: eps", eps, 0.0, 1.0, high_open=True)
        check_range("act: tau", tau, 0.0, float("inf"), high_open=True)
        check_choice("act: pool", pool, POOLS)
        self.eps, self.tau, self.pool = eps, tau, pool

    def decide(self, view: StepView) -> Tensor:
        run = self.run
        h = torch.sigmoid(pool_units(view.halt_logit(), view.granularity, self.pool).float())
        if view.loops < run.min_loops:
            h = torch.zeros_like(h)
        running = torch.ones_like(h, dtype=torch.bool) if view.active is None else view.active
        h = h * running
        # Out-of-place updates: the remainder and the mixture carry the graph to the loss.
        cumulative = run.buffer("cumulative")[view.rows]
        p, halts = act_step(cumulative, h, self.eps, view.is_last)
        halts = halts & running
        p = p * running
        remainder = run.buffer("remainder")
        run.buffers["remainder"] = remainder.index_put(
            (view.rows,), torch.where(halts, 1.0 - cumulative, remainder[view.rows]))
        run.buffers["cumulative"] = run.buffers["cumulative"].index_put((view.rows,),
                                                                        cumulative + h)
        weighted = p.view(*p.shape, *([1] * (3 - p.dim()))) * view.logits().float()  # (n, T, V)
        mixture = run.buffer("mixture", shape=(run.batch, *weighted.shape[1:]))
        run.buffers["mixture"] = mixture.index_add(0, view.rows, weighted)
        view.log("halt_prob", h)
        return halts

    def finish(self, draft: LoopDraft) -> None:
        remainder = self.run.buffers["remainder"]
        draft.logits = self.run.buffers["mixture"]
        draft.aux["remainder"] = remainder
        draft.aux["ponder_cost"] = ponder_cost(draft.depth, remainder)

    def loss_terms(self, out: LoopOutput, targets: Tensor) -> dict[str, Tensor]:
        terms = {"task": task_loss(out.logits, targets),
                 "ponder": self.tau * unit_mean(out.aux["ponder_cost"], targets, out.granularity)}
        out.loss_terms = terms
        return terms

    def hparams(self) -> dict[str, Any]:
        return {"eps": self.eps, "tau": self.tau, "pool": self.pool}


class GeometricHalting(LoopController):
    """Shared machinery of PonderNet, Ouro's exit gate and the halt token (see module docstring)."""

    capabilities = Capabilities(step_logits="train", provides_logits="train")

    def __init__(self, beta: float, pool: str) -> None:
        super().__init__()
        check_range(f"{self.name}: beta", beta, 0.0, float("inf"), high_open=True)
        check_choice(f"{self.name}: pool", pool, POOLS)
        self.beta, self.pool = beta, pool

    def lambdas(self, view: StepView) -> Tensor:
        """(n,) or (n, T) conditional halting probabilities at this step."""
        halt_logit = pool_units(view.halt_logit(), view.granularity, self.pool)
        return torch.sigmoid(halt_logit.float())

    def decide(self, view: StepView) -> Tensor | None:
        run = self.run
        lam = self.lambdas(view)
        if view.loops < run.min_loops:  # no halting mass before min_loops
            lam = torch.zeros_like(lam)
        view.log("halt_prob", lam)
        if run.training:
            run.append("lambdas", lam)  # every row runs: (B,) / (B, T)
            return None
        if view.active is not None:
            lam = lam * view.active
        survive = run.buffer("survive", fill=1.0)
        cdf = run.buffer("cdf")
        cdf[view.rows] = cdf[view.rows] + lam.detach() * survive[view.rows]
        survive[view.rows] = survive[view.rows] * (1.0 - lam.detach())
        return self.eval_stop(lam.detach(), cdf[view.rows])

    def eval_stop(self, lam: Tensor, cdf: Tensor) -> Tensor:
        """Evaluation exit rule given lambda_n and the CDF of p up to n (running units)."""
        raise NotImplementedError

    @torch.no_grad()
    def halting_distribution(self, model: nn.Module, ctx: Any, states: Tensor,
                             min_loops: int = 1) -> Tensor:
        """p (K, B) over loops 1..K of every sample, read off stored states ``z_0 .. z_K``.

        The distribution the training objective weighs the per-step losses with (sample
        granularity, lambda forced to 1 at the cap K and to 0 before ``min_loops``), so
        ``sum_n n p_n`` is the expected depth: the quantity the objective shapes, without the
        noise of one sampled exit. ``ctx`` is the batch's ``LoopContext`` (as for ``replay_loop``).
        """
        if not isinstance(states, Tensor) or states.dim() != 4 or states.shape[0] < 2:
            raise ValueError(f"{self.name}: states must be (K+1, B, T, D) with K >= 1, got "
                             f"{tuple(getattr(states, 'shape', ()))}")
        loops, batch = states.shape[0] - 1, states.shape[1]
        rows = torch.arange(batch, device=states.device)
        lambdas = []
        for k in range(loops):
            view = StepView(model, ctx, k, states[k + 1], states[k], rows, "sample", None, loops)
            lam = self.lambdas(view)
            lambdas.append(torch.zeros_like(lam) if k + 1 < min_loops else lam)
        return geometric_halting(torch.stack(lambdas))

    def expected_depth(self, model: nn.Module, ctx: Any, states: Tensor,
                       min_loops: int = 1) -> Tensor:
        """(B,) E[n] = sum_n n p_n of ``halting_distribution`` (float, in 1..K)."""
        p = self.halting_distribution(model, ctx, states, min_loops)
        n = torch.arange(1, p.shape[0] + 1, device=p.device, dtype=p.dtype)
        return (p * n.view(-1, 1)).sum(dim=0)

    def trajectory_exit(self, lambdas: Tensor, p: Tensor) -> Tensor:
        """The evaluation rule applied to a whole training trajectory: 1-based exit per unit."""
        raise NotImplementedError

    def finish(self, draft: LoopDraft) -> None:
        if not draft.training:
            return
        lambdas = torch.stack(self.run.steps["lambdas"])  # (K, *U)
        p = geometric_halting(lambdas)
        draft.aux.update(lambdas=lambdas, p=p)
        with torch.no_grad():
            draft.depth = self.trajectory_exit(lambdas.detach(), p.detach())
        draft.logits = gather_exit(draft.step_logits, draft.depth)

    def regulariser(self, p: Tensor) -> tuple[str, Tensor]:
        """Named per-unit regulariser of the halting distribution (already multiplied by beta)."""
        return "entropy", -self.beta * halting_entropy(p)

    def loss_terms(self, out: LoopOutput, targets: Tensor) -> dict[str, Tensor]:
        if not out.training or "p" not in out.aux:
            terms = super().loss_terms(out, targets)
            self.guard_eval_loss(out, terms)
            return terms
        p = out.aux["p"]
        step_losses = per_step_losses(out.step_logits, targets, out.granularity)  # (K, *U)
        name, reg = self.regulariser(p)
        terms = {"task": unit_mean(expected_loss(p, step_losses), targets, out.granularity),
                 name: unit_mean(reg, targets, out.granularity)}
        out.loss_terms = terms
        return terms


@CONTROLLERS.register("pondernet")
class PonderNet(GeometricHalting):
    """PonderNet (Banino et al. 2021): lambda_n = sigmoid(halt logit), KL to a geometric prior."""

    name = "pondernet"
    INFERENCE = ("sample", "threshold", "cdf")

    def __init__(self, lambda_prior: float = 0.2, beta: float = 0.01, inference: str = "sample",
                 threshold: float = 0.5, seed: int = 0, pool: str = "last") -> None:
        super().__init__(beta, pool)
        check_range("pondernet: lambda_prior", lambda_prior, 0.0, 1.0, low_open=True,
                    high_open=True)
        check_choice("pondernet: inference", inference, self.INFERENCE)
        check_range("pondernet: threshold", threshold, 0.0, 1.0, low_open=True)
        self.lambda_prior, self.inference, self.threshold = lambda_prior, inference, threshold
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def get_extra_state(self) -> dict[str, Any]:
        """The sampling generators' states travel with ``state_dict`` (checkpoints), so a resumed
        run samples exactly as an uninterrupted one."""
        return {"generators": {key: g.get_state() for key, g in self._generators.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._generators = {}
        saved = state.get("generators", {}) if isinstance(state, dict) else {}
        for key, generator_state in saved.items():
            try:
                generator = torch.Generator(device=key)
            except RuntimeError:  # saved on a device this machine lacks: start afresh there
                continue
            generator.set_state(generator_state)
            self._generators[key] = generator

    def eval_stop(self, lam: Tensor, cdf: Tensor) -> Tensor:
        if self.inference == "sample":
            return torch.bernoulli(lam, generator=self._generator(lam.device)).bool()
        if self.inference == "threshold":
            return lam >= self.threshold
        return cdf >= self.threshold - 1e-6

    def trajectory_exit(self, lambdas: Tensor, p: Tensor) -> Tensor:
        if self.inference == "cdf":
            return cdf_exit(p, self.threshold)
        if self.inference == "sample":
            stops = torch.bernoulli(lambdas, generator=self._generator(lambdas.device)).bool()
        else:
            stops = lambdas >= self.threshold
        stops[-1] = True
        return stops.float().argmax(dim=0) + 1

    def regulariser(self, p: Tensor) -> tuple[str, Tensor]:
        prior = truncated_geometric_prior(self.lambda_prior, p.shape[0], device=p.device,
                                          dtype=p.dtype)
        return "kl", self.beta * kl_to_prior(p, prior)

    def hparams(self) -> dict[str, Any]:
        return {"lambda_prior": self.lambda_prior, "beta": self.beta,
                "inference": self.inference, "threshold": self.threshold, "seed": self.seed,
                "pool": self.pool}


@CONTROLLERS.register("ouro_gate")
class OuroGate(GeometricHalting):
    """Ouro's exit gate: expected loss minus beta times the entropy of p; Q-exit at ``q``."""

    name = "ouro_gate"

    def __init__(self, beta: float = 0.05, q: float = 0.5, pool: str = "last") -> None:
        super().__init__(beta, pool)
        check_range("ouro_gate: q", q, 0.0, 1.0, low_open=True)
        self.q = q

    def eval_stop(self, lam: Tensor, cdf: Tensor) -> Tensor:
        return cdf >= self.q - 1e-6

    def trajectory_exit(self, lambdas: Tensor, p: Tensor) -> Tensor:
        return cdf_exit(p, self.q)

    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta, "q": self.q, "pool": self.pool}


@CONTROLLERS.register("halt_token")
class HaltToken(OuroGate):
    """lambda_n = softmax(logits)[..., halt_token_id] of the LM head at the new state."""

    name = "halt_token"

    def __init__(self, token_id: int | None = None, beta: float = 0.01, q: float = 0.5,
                 pool: str = "last") -> None:
        super().__init__(beta, q, pool)
        if token_id is not None:
            check_range("halt_token: token_id", token_id, 0, float("inf"), integer=True)
        self.token_id = token_id
        self.bound_token_id: int | None = token_id

    def bind(self, model: nn.Module) -> None:
        vocab = model.vocab_size
        token_id = self.token_id if self.token_id is not None else model.halt_token_id
        if token_id is None:
            raise ValueError("halt_token: the model has no halt token (its halt_token_id is "
                             "None) and no token_id was given; set halt_token_id in ModelConfig")
        if not 0 <= token_id < vocab:
            raise ValueError(f"halt_token: token_id={token_id} is outside the vocabulary "
                             f"[0, {vocab - 1}]")
        self.bound_token_id = token_id

    def lambdas(self, view: StepView) -> Tensor:
        halt_prob = view.probs()[..., self.bound_token_id]  # (n, T)
        return pool_units(halt_prob, view.granularity, self.pool)

    def hparams(self) -> dict[str, Any]:
        return {"token_id": self.token_id, **super().hparams()}
