"""Example diagnostic (not shipped): the RMS of the state after each loop. One file: the function
and its registration."""

from __future__ import annotations

from torch import Tensor

from experiments.evaluate import DIAGNOSTICS


@DIAGNOSTICS.register("state_rms")
def state_rms(states: Tensor) -> Tensor:
    """(K,) root mean square of z_k over samples, tokens and width, for loops k = 1..K."""
    return states[1:].flatten(start_dim=1).pow(2).mean(dim=1).sqrt()
