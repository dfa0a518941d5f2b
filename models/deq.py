"""Deep equilibrium block (Bai, Kolter & Koltun 2019), built to be contractive (FPRM).

``step`` is the same map at every k: ``f(z, x) = x + (Stack(u) - u)`` with ``u = z + x``
(``injection="add"``) or ``u = Adapter([z; x])`` (``"concat"``), where ``x = RMSNorm(E)`` and
``Stack`` is the pre-norm block stack whose residual branches are scaled by ``residual_scale`` s.
``Stack(u) - u`` is the sum of the scaled branches, so the identity path carries the injection x,
not z.

Contraction argument: with ``deq_norm`` (torchdeq's ``apply_norm``: ``spectral`` gives every
linear map of the stack and adapter spectral norm g = 1 at init, ``weight`` unit-norm rows), each
branch is a composition of RMSNorm (Lipschitz ~ gain / rms of its input, ~1 here because the state
stays at the scale of x, rms ~1), maps of operator norm <= 1 and a softmax attention / SwiGLU whose
local Lipschitz constants are O(1) at unit-scale inputs, so ``Lip_z f <= s * Lip(branches)`` and
s = 0.5 makes the map contractive at init in practice. This is not a global bound (attention and
SwiGLU are not globally Lipschitz, and the learned gains g can grow in training); the tests check
the residual ||f(z) - z|| shrinking over 30 iterations at init, and ``fixedpoint`` solvers report
non-convergence when training breaks it.

The normalised weights are recomputed once per ``prepare`` (torchdeq's ``reset_norm``, one power
iteration in training mode), never inside ``step``, so every step of one context uses exactly the
same map.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torchdeq.norm import apply_norm, reset_norm

from models.base import LoopContext
from models.config import ModelConfig
from models.kv_cache import DecodeCache, DecodePositions
from models.layers import RMSNorm
from models.looped import ARCH_REGISTRY, TransformerLoop

_TORCHDEQ_NORMS = {"weight": "weight_norm", "spectral": "spectral_norm"}
_WARMUP_POWER_ITERATIONS = 30  # converge the spectral-norm singular vectors at construction


@ARCH_REGISTRY.register("deq")
class DEQ(TransformerLoop):
    """Input-injected, normalised block stack meant to be iterated (or solved) to a fixed point."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        dim = config.d_model
        self.residual_scale = config.residual_scale
        self.input_norm = RMSNorm(dim)
        self.adapter = nn.Linear(2 * dim, dim, bias=False) if config.injection == "concat" else None
        self.init_weights()
        if config.deq_norm != "none":
            apply_norm(self.blocks, _TORCHDEQ_NORMS[config.deq_norm])
            if self.adapter is not None:
                apply_norm(self.adapter, _TORCHDEQ_NORMS[config.deq_norm])
            with torch.no_grad():
                for _ in range(_WARMUP_POWER_ITERATIONS):
                    self._reset_norms()
            self._detach_norm_weights()

    def _normed(self) -> list[nn.Module]:
        return [self.blocks] + ([self.adapter] if self.adapter is not None else [])

    def _reset_norms(self) -> None:
        for module in self._normed():
            reset_norm(module)

    def _detach_norm_weights(self) -> None:
        for module in self.modules():
            if hasattr(module, "_deq_norm") and isinstance(module.weight, Tensor):
                module.weight = module.weight.detach()

    def __deepcopy__(self, memo: dict[int, Any]) -> DEQ:
        # the normalised weights of the last prepare are graph tensors; deepcopy cannot copy them
        self._detach_norm_weights()
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    def _prepare_inject(self, ctx: LoopContext) -> Tensor:
        if self.config.deq_norm != "none":
            self._reset_norms()  # once per context: every step of it is the same map
        return self.input_norm(ctx.inject)

    def init_state(self, ctx: LoopContext, generator: torch.Generator | None = None) -> Tensor:
        """Deterministic: ``generator`` is accepted (the interface) and unused."""
        return torch.zeros_like(ctx.inject)

    def _loop_output(self, x: Tensor, y: Tensor, inject: Tensor, k: int) -> Tensor:
        return inject + (y - x)

    def decode_inject(self, tokens: Tensor, cache: DecodeCache, at: DecodePositions,
                      rows: Tensor | None = None) -> Tensor:
        # the normalised weights of the prompt's prepare stay in place: no reset per token
        return self.input_norm(self.embed(tokens))
