"""Example controller (not shipped): a row stops once its state's relative change falls below
``threshold`` — no patience, no reduction choice. One file: the class and its registration."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from halting import CONTROLLERS, LoopController


@CONTROLLERS.register("small_step")
class SmallStep(LoopController):
    """Stop a unit when ||z_k - z_{k-1}|| / ||z_k|| < ``threshold``."""

    name = "small_step"

    def __init__(self, threshold: float = 0.05) -> None:
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"small_step: threshold must be > 0, got {threshold!r}")
        self.threshold = threshold

    def decide(self, view) -> Tensor | None:
        return view.residual() < self.threshold  # (n,) per sample, (n, T) per token

    def hparams(self) -> dict[str, Any]:
        return {"threshold": self.threshold}
