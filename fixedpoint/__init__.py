"""Maps z -> f(z): per-sample solvers, implicit gradients, Jacobian spectra, trajectory verdicts.

Stands alone: imports only torch and numpy (and torchdeq for the ``torchdeq.<name>`` pass-through).
Public names are resolved lazily so that importing one submodule never pulls in the others.
"""

from __future__ import annotations

import importlib
from typing import Any

# ``solve`` is both a submodule and a function: bind the function eagerly, so that a later
# ``import fixedpoint.solve`` elsewhere cannot leave the module object under the public name.
from fixedpoint.solve import SOLVERS, Solution, register_solver, solve

_PUBLIC = {
    "Registry": "common.registry",
    "spectral_radius": "fixedpoint.spectral",
    "lyapunov_exponent": "fixedpoint.spectral",
    "classify": "fixedpoint.verdicts",
    "Verdicts": "fixedpoint.verdicts",
    "LABELS": "fixedpoint.verdicts",
}

__all__ = [
    "LABELS", "SOLVERS", "Registry", "Solution", "Verdicts", "classify", "lyapunov_exponent",
    "register_solver", "solve", "spectral_radius",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fixedpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
