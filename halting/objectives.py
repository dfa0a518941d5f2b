"""The mathematics of learned halting, as pure tensor functions (tested on hand-made numbers).

Shapes: ``K`` steps first, then the halting unit ``U`` — ``(B,)`` per sample or ``(B, T)`` per
token. Every loss here is computed **per unit first** and only then averaged (REFERENCE.md §2: the
lucidrains PonderNet port averages the task loss over the batch before weighting it with p_n, so
the halting distribution gets the same signal for every sample and learns nothing).

Sources:
* ACT — Graves 2016, "Adaptive Computation Time for Recurrent Neural Networks" (arXiv 1603.08983):
  N = first n with sum_{j<=n} h_j >= 1 - eps; R = 1 - sum_{n<N} h_n; p_n = h_n (n < N), p_N = R;
  ponder cost rho = N + R (gradient reaches h only through R).
* PonderNet — Banino et al. 2021 (arXiv 2107.05407): p_n = lambda_n prod_{j<n} (1 - lambda_j), with
  lambda forced to 1 at the cap; loss sum_n p_n L_n + beta KL(p || p_G(lambda_p)). The KL is
  KL(p || prior) (the labml and mildlyoverfitted ports compute the reverse).
* Ouro — arXiv 2510.25741: the same p(t) with the last step taking the rest; loss
  sum_t p(t) L_t - beta H(p); Q-exit: first t whose CDF reaches q.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from halting.base import IGNORE_INDEX


def per_step_losses(step_logits: Tensor, targets: Tensor, granularity: str) -> Tensor:
    """Cross-entropy of every step's readout, per unit.

    Args:
        step_logits: (K, B, T, V).
        targets: (B, T) int64, ``-100`` = ignore.
        granularity: ``sample`` -> (K, B) mean over each sample's own non-ignored tokens;
            ``token`` -> (K, B, T) per token (0 where ignored).
    """
    steps, batch, seq_len, vocab = step_logits.shape
    ce = F.cross_entropy(step_logits.float().reshape(-1, vocab),
                         targets.expand(steps, batch, seq_len).reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none")
    ce = ce.view(steps, batch, seq_len)  # (K, B, T)
    if granularity == "token":
        return ce
    counted = (targets != IGNORE_INDEX).sum(dim=1).clamp_min(1)  # (B,)
    return ce.sum(dim=2) / counted


def unit_mean(values: Tensor, targets: Tensor, granularity: str) -> Tensor:
    """Average per-unit values (B,) / (B, T) over units that have a target."""
    has_target = targets != IGNORE_INDEX  # (B, T)
    if granularity == "sample":
        has_target = has_target.any(dim=1)  # (B,)
    weight = has_target.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def geometric_halting(lambdas: Tensor) -> Tensor:
    """p_n = lambda_n prod_{j<n}(1 - lambda_j) with lambda_K forced to 1, so p sums to 1.

    Args:
        lambdas: (K, *U) conditional halting probabilities in [0, 1].

    Returns:
        (K, *U) unconditional halting distribution over steps 1..K.
    """
    forced = torch.cat([lambdas[:-1], torch.ones_like(lambdas[-1:])])
    survive = torch.cumprod(1.0 - lambdas[:-1], dim=0)  # (K-1, *U): prod_{j<=n}(1 - lambda_j)
    survive_before = torch.cat([torch.ones_like(lambdas[:1]), survive])  # prod_{j<n}
    return forced * survive_before


def truncated_geometric_prior(lambda_prior: float, steps: int, *,
                              device: torch.device | None = None,
                              dtype: torch.dtype = torch.float32) -> Tensor:
    """p_G(n) = lambda_p (1 - lambda_p)^(n-1), n = 1..K, normalised to sum to 1 over K steps."""
    n = torch.arange(steps, device=device, dtype=dtype)
    prior = lambda_prior * (1.0 - lambda_prior) ** n
    return prior / prior.sum()


def _safe_log(p: Tensor) -> Tensor:
    """log p with p = 0 mapped to a finite value: 0 log 0 = 0 *and* its gradient stays finite
    (``xlogy``'s gradient is NaN at 0, which a saturated halting unit reaches in float32)."""
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def kl_to_prior(p: Tensor, prior: Tensor) -> Tensor:
    """KL(p || prior) = sum_n p_n (log p_n - log prior_n) per unit; p: (K, *U), prior: (K,)."""
    prior = prior.view(-1, *([1] * (p.dim() - 1)))
    return (p * (_safe_log(p) - prior.log())).sum(dim=0)


def halting_entropy(p: Tensor) -> Tensor:
    """H(p) = -sum_n p_n log p_n per unit; p: (K, *U)."""
    return -(p * _safe_log(p)).sum(dim=0)


def expected_loss(p: Tensor, step_losses: Tensor) -> Tensor:
    """sum_n p_n L_n per unit (both (K, *U))."""
    return (p * step_losses).sum(dim=0)


def cdf_exit(p: Tensor, q: float) -> Tensor:
    """1-based first step whose CDF reaches ``q`` (Ouro's Q-exit); the last step if none does."""
    reached = torch.cumsum(p, dim=0) >= q - 1e-6  # (K, *U)
    reached[-1] = True
    return reached.float().argmax(dim=0) + 1


def act_step(cumulative: Tensor, h: Tensor, eps: float, last: bool) -> tuple[Tensor, Tensor]:
    """One ACT step: returns (p_n, halts_now) given sum_{j<n} h_j and h_n (same shapes).

    A unit halts when its cumulative halting mass would reach 1 - eps (or at the cap) and then
    spends the remainder R = 1 - sum_{j<n} h_j as p_N.
    """
    halts = cumulative + h >= 1.0 - eps
    if last:
        halts = torch.ones_like(halts)
    p = torch.where(halts, 1.0 - cumulative, h)
    return p, halts


def act_weights(h: Tensor, eps: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """Graves' ACT over a whole trajectory of halting units.

    Args:
        h: (K, *U) halting units h_n in [0, 1].
        eps: the 1 - eps halting threshold.

    Returns:
        p (K, *U) with zeros after each unit's exit, N (*U) int64 exit step (1-based), and the
        remainder R (*U).
    """
    cumulative = torch.zeros_like(h[0])
    running = torch.ones_like(h[0], dtype=torch.bool)
    exit_step = torch.zeros_like(h[0], dtype=torch.long)
    remainder = torch.zeros_like(h[0])
    weights = []
    for n in range(h.shape[0]):
        p, halts = act_step(cumulative, h[n], eps, last=n == h.shape[0] - 1)
        now = halts & running
        weights.append(torch.where(running, p, torch.zeros_like(p)))
        exit_step = torch.where(now, n + 1, exit_step)
        remainder = torch.where(now, 1.0 - cumulative, remainder)
        cumulative = cumulative + torch.where(running, h[n], torch.zeros_like(h[n]))
        running = running & ~halts
    return torch.stack(weights), exit_step, remainder


def ponder_cost(exit_step: Tensor, remainder: Tensor) -> Tensor:
    """rho = N + R per unit; N is an integer, so gradients reach the halting units only via R."""
    return exit_step.to(remainder.dtype) + remainder
