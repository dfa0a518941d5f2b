"""Example architecture (not shipped): a serial loop whose update is damped,
z_{k+1} = (1 - a) z_k + a * loop(z_k) with a = 1/2. One file: the class and its registration."""

from __future__ import annotations

from torch import Tensor

from models.looped import ARCH_REGISTRY
from models.serial_loop import SerialLoop

DAMPING = 0.5


@ARCH_REGISTRY.register("damped_loop")
class DampedLoop(SerialLoop):
    """``serial_loop`` with a damped update: half the old state, half the new."""

    def step(self, z: Tensor, ctx, k: int, active: Tensor | None = None) -> Tensor:
        return (1 - DAMPING) * z + DAMPING * super().step(z, ctx, k, active)
