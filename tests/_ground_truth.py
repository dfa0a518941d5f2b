"""Ground truth for the verdict tests, computed independently of ``fixedpoint``."""

from __future__ import annotations

import math

import torch


def qr_lyapunov(f, z: torch.Tensor, steps: int) -> float:
    """Largest exponent per step from a full tangent frame re-orthonormalised by QR every step.

    ``f`` maps a (1, D) state; ``z`` is (1, D); the Jacobian of each step comes from autograd.
    """
    frame = torch.eye(z.shape[1], dtype=torch.float64)
    total = 0.0
    for _ in range(steps):
        jac = torch.autograd.functional.jacobian(lambda s: f(s[None])[0], z[0])
        z = f(z)
        q, r = torch.linalg.qr(jac @ frame)
        frame = q
        total += math.log(abs(float(r[0, 0])))
    return total / steps
