"""Looped transformers behind one step interface (see ``models.base``)."""

from models.base import LoopContext, LoopedModel
from models.config import ARCHS, ModelConfig

__all__ = ["ARCHS", "LoopContext", "LoopedModel", "ModelConfig"]
