"""Looped transformers behind one step interface (see ``models.base``).

Architectures (``ARCH_REGISTRY``): ``parallel_loop``, ``serial_loop``, ``recurrent_depth``, ``deq``.
"""

from models.base import LoopContext, LoopedModel
from models.build import build_model
from models.config import ARCHS, ModelConfig
from models.io import load_model, save_model
from models.looped import ARCH_REGISTRY

__all__ = [
    "ARCHS",
    "ARCH_REGISTRY",
    "LoopContext",
    "LoopedModel",
    "ModelConfig",
    "build_model",
    "load_model",
    "save_model",
]
