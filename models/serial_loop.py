"""Serial loop: Universal Transformer (Dehghani et al. 2019) / Ouro-LoopLM (arXiv 2510.25741).

REFERENCE.md §1. The whole block stack is applied once per loop with full causal attention and an
RMSNorm after each loop (Ouro). Input injection as in looped transformers for algorithms (Yang et
al. 2023, ``Y_t = M(Y_{t-1} + P)``): ``injection="add"`` feeds ``z + E``, ``"concat"`` feeds
``Linear(2d -> d)([z; E])``, ``"none"`` feeds ``z`` alone. The state starts at zeros with
injection and at E without. ``loop_embedding`` adds a learned embedding of the loop index
(clamped to ``max_loop_embeddings - 1``) to the loop input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import LoopContext
from models.config import ModelConfig
from models.layers import RMSNorm, TokenPack
from models.looped import ARCH_REGISTRY, TransformerLoop


@ARCH_REGISTRY.register("serial_loop")
class SerialLoop(TransformerLoop):
    """The same block stack every loop, full attention, a norm after each loop."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        dim = config.d_model
        self.adapter = nn.Linear(2 * dim, dim, bias=False) if config.injection == "concat" else None
        self.loop_embed = (
            nn.Embedding(config.max_loop_embeddings, dim) if config.loop_embedding else None
        )
        self.loop_norm = RMSNorm(dim)
        self.init_weights()

    def init_state(self, ctx: LoopContext, generator: torch.Generator | None = None) -> Tensor:
        """Deterministic: ``generator`` is accepted (the interface) and unused."""
        if self.config.injection == "none":
            return ctx.inject
        return torch.zeros_like(ctx.inject)

    def _loop_input(
        self, z: Tensor, inject: Tensor, ctx: LoopContext, k: int, pack: TokenPack | None
    ) -> Tensor:
        z = super()._loop_input(z, inject, ctx, k, pack)
        if self.loop_embed is not None:
            index = min(k, self.config.max_loop_embeddings - 1)
            z = z + self.loop_embed.weight[index].to(z.dtype)
        return z

    def _loop_output(self, x: Tensor, y: Tensor, inject: Tensor, k: int) -> Tensor:
        return self.loop_norm(y)
