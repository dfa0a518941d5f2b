"""Recurrent depth (Huginn, arXiv 2502.05171; seal-rg/recurrent-pretraining).

REFERENCE.md §1: ``e = Prelude(E)``; ``s_0 ~ TruncNormal(0, init_scale^2)`` cut at +-3 std (zeros
when ``init_scale == 0``); each loop ``s = Core(Adapter([s; e]))`` with Adapter = Linear(2d -> d)
(``injection="concat"``) or ``s + e`` (``"add"``); ``readout`` = LM head of the final norm of
``Coda(s)``. The core is the shared pre-norm block stack followed by an RMSNorm, which keeps the
state's scale fixed over long unrolls (Huginn's sandwich core ends in a norm for the same reason).
The prelude and coda attend causally over the full sequence; their captured attention is
recorded with ``loop = -1`` and ``kind`` ``prelude`` / ``coda``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import LoopContext
from models.config import ModelConfig
from models.kv_cache import DecodeCache, DecodePositions
from models.layers import RMSNorm
from models.looped import ARCH_REGISTRY, TransformerLoop


@ARCH_REGISTRY.register("recurrent_depth")
class RecurrentDepth(TransformerLoop):
    """Prelude -> random initial state -> core with input injection, looped -> coda."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        dim = config.d_model
        self.prelude = nn.ModuleList(self.new_block() for _ in range(config.prelude_layers))
        self.coda = nn.ModuleList(self.new_block() for _ in range(config.coda_layers))
        self.adapter = nn.Linear(2 * dim, dim, bias=False) if config.injection == "concat" else None
        self.core_norm = RMSNorm(dim)
        self.init_weights()

    def _prepare_inject(self, ctx: LoopContext) -> Tensor:
        return self._run_plain(self.prelude, ctx.inject, ctx, "prelude")

    def init_state(self, ctx: LoopContext, generator: torch.Generator | None = None) -> Tensor:
        """s_0 (B, T, D) ~ N(0, init_scale^2) truncated to +-3 std.

        Args:
            ctx: the prepared context (gives shape, device and dtype).
            generator: optional ``torch.Generator`` on the state's device; without it torch's
                global RNG is used, so ``torch.manual_seed`` makes the state reproducible.
        """
        scale = self.config.init_scale
        state = torch.zeros_like(ctx.inject)
        if scale == 0:
            return state
        return nn.init.trunc_normal_(state, 0.0, scale, -3 * scale, 3 * scale, generator=generator)

    def _loop_output(self, x: Tensor, y: Tensor, inject: Tensor, k: int) -> Tensor:
        return self.core_norm(y)

    def readout(self, z: Tensor, ctx: LoopContext) -> Tensor:
        return self.lm_head(self.final_norm(self._run_plain(self.coda, z, ctx, "coda")))

    # -- decoding (models.decoding): the prelude and the coda keep caches of their own
    def _add_decode_buffers(self, cache: DecodeCache, batch: int, capacity: int, loops: int,
                            dtype: torch.dtype) -> None:
        super()._add_decode_buffers(cache, batch, capacity, loops, dtype)
        self._add_buffer(cache, "prelude", len(self.prelude), 1, batch, capacity, dtype)
        self._add_buffer(cache, "coda", len(self.coda), 1, batch, capacity, dtype)

    def decode_inject(self, tokens: Tensor, cache: DecodeCache, at: DecodePositions,
                      rows: Tensor | None = None) -> Tensor:
        return self._decode_plain(self.prelude, "prelude", self.embed(tokens), cache, at, rows)

    def decode_readout(self, z: Tensor, cache: DecodeCache, at: DecodePositions,
                       rows: Tensor | None = None) -> Tensor:
        coda = self._decode_plain(self.coda, "coda", z, cache, at, rows)
        return self.lm_head(self.final_norm(coda))
