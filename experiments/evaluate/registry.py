"""Per-loop diagnostics beyond ``diagnostics.per_loop_table``, found by name in ``DIAGNOSTICS``.

A diagnostic is a function of the unrolled trajectory ``states`` (K+1, B, T, D) returning one
value per loop, (K,) for loops 1..K; its rows land in ``results.parquet`` as
``(controller="fixed", loop=k, metric=<name>, value)`` beside the built-in ones. Adding one is one
module with ``@DIAGNOSTICS.register("name")`` and one import line in
``experiments/evaluate/__init__.py``.

Example:
    >>> @DIAGNOSTICS.register("mean_norm")
    ... def mean_norm(states):
    ...     return states[1:].flatten(start_dim=1).norm(dim=1) / states[0].numel() ** 0.5
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from common.registry import Registry

DIAGNOSTICS: Registry[Callable[[Tensor], Tensor]] = Registry("diagnostic")


def registered_rows(states: Tensor) -> list[tuple[int, str, float]]:
    """``(loop, name, value)`` of every registered diagnostic on ``states`` (K+1, B, T, D)."""
    rows = []
    for name in DIAGNOSTICS:
        values = DIAGNOSTICS.get(name)(states).detach().float().cpu()
        if values.shape != (states.shape[0] - 1,):
            raise ValueError(f"diagnostic {name!r} returned shape {tuple(values.shape)}; "
                             f"expected ({states.shape[0] - 1},), one value per loop")
        rows += [(k + 1, name, float(v)) for k, v in enumerate(values.tolist())]
    return rows
