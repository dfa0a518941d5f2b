"""Maps z -> f(z): per-sample solvers, implicit gradients, Jacobian spectra, trajectory verdicts.

Stands alone: imports only torch and numpy (and torchdeq for the ``torchdeq.<name>`` pass-through).
Public names are resolved lazily so that importing one submodule never pulls in the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Registry": "fixedpoint.registry",
    "solve": "fixedpoint.solve",
    "Solution": "fixedpoint.solve",
    "register_solver": "fixedpoint.solve",
    "SOLVERS": "fixedpoint.solve",
    "spectral_radius": "fixedpoint.spectral",
    "lyapunov_exponent": "fixedpoint.spectral",
    "classify": "fixedpoint.verdicts",
    "Verdicts": "fixedpoint.verdicts",
    "LABELS": "fixedpoint.verdicts",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fixedpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
