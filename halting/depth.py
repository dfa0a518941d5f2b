"""Huginn's randomised training depth (Geiping et al. 2025, arXiv 2502.05171, §3.3).

tau ~ LogNormal(log r_mean - sigma^2 / 2, sigma), r = Poisson(tau) + 1: a heavy-tailed loop count
whose mean is about ``r_mean + 1``. Pair it with ``run_loop(..., grad_steps=n)`` (Huginn
backpropagates through the last min(r, 8) steps).
"""

from __future__ import annotations

import math

import torch

from halting.base import check_range


def sample_training_depth(mean_loops: float, sigma: float = 0.5,
                          generator: torch.Generator | None = None, *,
                          max_loops: int | None = None) -> int:
    """Draw one training loop count, clamped to [1, ``max_loops``].

    Args:
        mean_loops: r_mean, the mean of the log-normal rate.
        sigma: log-normal spread (Huginn: 0.5).
        generator: a CPU ``torch.Generator`` for reproducible draws.
        max_loops: upper clamp (``None``: no cap).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_training_depth(8, generator=g, max_loops=32)
    """
    check_range("mean_loops", mean_loops, 0.0, math.inf, low_open=True, high_open=True)
    check_range("sigma", sigma, 0.0, math.inf, high_open=True)
    if max_loops is not None:
        check_range("max_loops", max_loops, 1, math.inf, integer=True)
    normal = torch.randn((), generator=generator, dtype=torch.float64)
    tau = torch.exp(math.log(mean_loops) - sigma**2 / 2 + sigma * normal)
    loops = int(torch.poisson(tau, generator=generator).item()) + 1
    return loops if max_loops is None else min(loops, max_loops)
