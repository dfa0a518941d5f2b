"""``TransformerLoop``: the machinery every architecture shares, and ``ARCH_REGISTRY``.

Each architecture subclasses ``TransformerLoop`` and supplies three hooks: ``_loop_input`` (what the
looped stack reads at loop k), ``_loop_output`` (how the stack output becomes the next state) and
optionally ``_mixer`` (how queries meet keys/values, e.g. PLT's gated two-branch attention). This
class owns input validation, embeddings, the LM and halting heads, the layer stack, attention
capture, FLOP counts and the two step paths:

- ``active=None`` (the benchmark path): every position is computed with fused attention; the keys
  and values of each layer are kept in ``ctx.cache`` by reference (no copy, no extra compute) so a
  later token-granularity step can use them.
- ``active`` (B, T) bool (token granularity, *frozen* policy, REFERENCE.md §2 "benchmarking
  traps"): the active positions of each row are packed to (B, T_active_max, D); projections,
  attention queries and MLPs run only on them. Keys/values of inactive positions are the ones cached
  the last time those positions were computed; inactive positions return their input state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from common.registry import Registry
from models.base import LoopContext, LoopedModel
from models.config import ModelConfig
from models.decoding import CachedDecoding
from models.layers import Block, Mixer, RMSNorm, Rotary, TokenPack, attend

ARCH_REGISTRY: Registry[type[LoopedModel]] = Registry("architecture")

HALT_BIAS_INIT = -2.0
"""Initial halting-head bias: sigmoid(-2) ~= 0.12, so a learned halting distribution starts spread
over several loops instead of collapsing onto loop 1 (ACT's +1 bias halts almost at once)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TransformerLoop(CachedDecoding, LoopedModel):
    """Base of the four architectures; see the module docstring for the step paths."""

    pack_tokens: bool = True  # False: token steps keep positions in place (test reference layout)
    residual_scale: float = 1.0  # scale on each residual branch of the looped stack

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        dim = config.d_model
        self.embed = nn.Embedding(config.vocab_size, dim)
        self.blocks = nn.ModuleList(self.new_block() for _ in range(config.n_layers))
        self.final_norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, config.vocab_size, bias=False)
        self.halt_norm = RMSNorm(dim)
        self.halt_head = nn.Linear(dim, 1)
        self.rotary = Rotary(dim // config.n_heads, config.max_seq_len, config.rope_base)
        causal = torch.ones(config.max_seq_len, config.max_seq_len, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal, persistent=False)

    def new_block(self) -> Block:
        cfg = self.config
        return Block(cfg.d_model, cfg.n_heads, cfg.mlp_ratio * cfg.d_model, cfg.mlp, cfg.dropout)

    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), output projections / sqrt(2 * layers); ties the LM head."""
        depth = max(1, 2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(depth) if name.endswith(("attn.out", "mlp.w2")) else 0.02
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.halt_head.bias, HALT_BIAS_INIT)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ----------------------------------------------------------------- validation
    def check_tokens(self, tokens: object) -> Tensor:
        """Reject anything but an int (B, T) tensor of ids in range with T <= max_seq_len."""
        cfg = self.config
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of ids, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids (int64), got dtype {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (B, T), got shape {tuple(tokens.shape)}")
        batch, seq = tokens.shape
        if batch < 1 or seq < 1:
            raise ValueError(f"tokens must be non-empty (B, T), got shape {tuple(tokens.shape)}")
        if seq > cfg.max_seq_len:
            raise ValueError(f"sequence length T={seq} exceeds max_seq_len={cfg.max_seq_len}")
        device = self.embed.weight.device
        if tokens.device != device:
            raise ValueError(f"tokens are on device {tokens.device} but the model is on {device}; "
                             "move them with tokens.to(device)")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} outside [0, {cfg.vocab_size}) (vocab_size)")
        return tokens.long()

    @staticmethod
    def check_loops(loops: object) -> int:
        if not _is_int(loops) or loops < 1:
            raise ValueError(f"loops must be an integer >= 1, got {loops!r}")
        return int(loops)

    def _check_step(self, z: Tensor, ctx: LoopContext, k: object, active: Tensor | None) -> None:
        if not _is_int(k) or k < 0:
            raise ValueError(f"loop index k must be an integer >= 0, got {k!r}")
        want = (*ctx.tokens.shape, self.config.d_model)
        if not isinstance(z, Tensor) or tuple(z.shape) != want:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"state z must have shape {want} (B, T, d_model), got {got}")
        if active is not None and (active.dtype != torch.bool or active.shape != ctx.tokens.shape):
            raise ValueError(
                f"active must be a bool mask of shape {tuple(ctx.tokens.shape)} (B, T), got "
                f"{active.dtype} {tuple(active.shape)}"
            )

    # ----------------------------------------------------------------- the public interface
    def prepare(self, tokens: Tensor, *, capture_attention: bool = False,
                keep_kv: bool = False) -> LoopContext:
        """Embed ``tokens``; ``keep_kv`` also keeps the keys/values of the blocks outside the
        loop (prelude, coda) in ``ctx.extras["plain_kv"]`` for a decode cache."""
        tokens = self.check_tokens(tokens)
        ctx = LoopContext(tokens=tokens, inject=self.embed(tokens))
        ctx.attention = [] if capture_attention else None
        if keep_kv:
            ctx.extras["plain_kv"] = {}
        ctx.inject = self._prepare_inject(ctx)
        return ctx

    def _prepare_inject(self, ctx: LoopContext) -> Tensor:
        """What the loop reads from the input; the token embeddings unless overridden."""
        return ctx.inject

    def step(self, z: Tensor, ctx: LoopContext, k: int, active: Tensor | None = None) -> Tensor:
        self._check_step(z, ctx, k, active)
        if active is None:
            return self._step(z, ctx, k, None)
        per_row = active.sum(dim=1)  # (B,)
        fewest, most = torch.stack(torch.aminmax(per_row)).tolist()  # the one host sync
        if fewest == active.shape[1]:  # all active: the common path, bit for bit
            return self._step(z, ctx, k, None)
        if most == 0:
            return z
        self._require_frozen_kv(ctx, k)
        pack = (TokenPack.from_mask(active, (fewest, most)) if self.pack_tokens
                else TokenPack.dense(active))
        return self._step(z, ctx, k, pack)

    def _step(self, z: Tensor, ctx: LoopContext, k: int, pack: TokenPack | None) -> Tensor:
        inject = ctx.inject if pack is None else pack.gather(ctx.inject)
        x = self._loop_input(z, inject, ctx, k, pack)
        y = self._run_stack(x, ctx, k, pack)
        out = self._loop_output(x, y, inject, k)
        return out if pack is None else pack.scatter(z, out)

    def _loop_input(
        self, z: Tensor, inject: Tensor, ctx: LoopContext, k: int, pack: TokenPack | None
    ) -> Tensor:
        """Input injection (``config.injection``): ``add`` gives z + e, ``concat`` Huginn's adapter
        Linear([z; e]) (an ``adapter`` attribute built by the subclass), ``none`` z itself."""
        z = z if pack is None else pack.gather(z)
        mode = self.config.injection
        if mode == "add":
            return z + inject
        if mode == "concat":
            both = torch.cat((z, inject.to(z.dtype)), dim=-1)  # (B, T, 2D)
            return self.adapter(both)  # (B, T, D)
        return z

    def _loop_output(self, x: Tensor, y: Tensor, inject: Tensor, k: int) -> Tensor:
        raise NotImplementedError

    def readout(self, z: Tensor, ctx: LoopContext) -> Tensor:
        return self.lm_head(self.final_norm(z))

    def halt_logit(self, z: Tensor, ctx: LoopContext) -> Tensor:
        """Exit-gate logit (B, T): Linear(D, 1) on RMSNorm(z), bias initialised to -2."""
        return self.halt_head(self.halt_norm(z)).squeeze(-1)

    def forward(self, tokens: Tensor, loops: int,
                generator: torch.Generator | None = None) -> Tensor:
        loops = self.check_loops(loops)
        ctx = self.prepare(tokens)
        z = self.init_state(ctx) if generator is None else self.init_state(ctx, generator)
        for k in range(loops):
            z = self.step(z, ctx, k)
        return self.readout(z, ctx)

    # ----------------------------------------------------------------- the layer stack
    def _run_stack(self, x: Tensor, ctx: LoopContext, k: int, pack: TokenPack | None) -> Tensor:
        cos, sin = self.rotary.tables(ctx.tokens.shape[1], None if pack is None else pack.pos)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, self._mixer(ctx, k, i, pack), self.residual_scale)
        return x

    def _mixer(self, ctx: LoopContext, k: int, layer: int, pack: TokenPack | None) -> Mixer:
        """Causal attention over this loop's own keys/values (frozen ones for inactive tokens)."""

        def mix(q: Tensor, keys: Tensor, values: Tensor, h: Tensor) -> Tensor:
            keys, values = self._own_kv(ctx, layer, pack, keys, values)
            return self._attend(ctx, k, layer, "full", q, keys, values, pack)

        return mix

    def _own_kv(
        self, ctx: LoopContext, layer: int, pack: TokenPack | None, keys: Tensor, values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Store this layer's K/V (full step) or merge fresh active K/V into the frozen ones."""
        name_k, name_v = f"own_k.{layer}", f"own_v.{layer}"
        if pack is not None:
            keys = pack.scatter_heads(ctx.cache[name_k], keys)
            values = pack.scatter_heads(ctx.cache[name_v], values)
        ctx.cache[name_k], ctx.cache[name_v] = keys, values
        return keys, values

    def _require_frozen_kv(self, ctx: LoopContext, k: int) -> None:
        if "own_k.0" not in ctx.cache:
            raise ValueError(
                f"step k={k} with a partial `active` mask needs the keys/values of a previous full "
                "step in ctx.cache; run a step with active=None first (loop 0 always is)"
            )

    def _attend(
        self,
        ctx: LoopContext,
        k: int,
        layer: int,
        kind: str,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        pack: TokenPack | None,
        window_mask: Tensor | None = None,
        window: int | None = None,
    ) -> Tensor:
        """One attention call: fused by default, explicit (and recorded) when asked."""
        use_math = self.config.attention == "math"
        record = self._recorder(ctx, k, layer, kind, pack)
        seq = keys.shape[2]
        if pack is not None:  # masks built once per step; additive for the fused kernel
            if use_math or record is not None:
                return attend(q, keys, values, mask=pack.key_mask(seq, window), use_math=True,
                              record=record)
            return attend(q, keys, values, mask=pack.additive_mask(seq, window, q.dtype))
        if window_mask is not None:
            return attend(q, keys, values, mask=window_mask, use_math=use_math, record=record)
        if use_math or record is not None:
            return attend(q, keys, values, mask=self.causal_mask[:seq, :seq], use_math=True,
                          record=record)
        return attend(q, keys, values, causal=True)

    @staticmethod
    def _recorder(
        ctx: LoopContext, k: int, layer: int, kind: str, pack: TokenPack | None
    ) -> Callable[[Tensor], None] | None:
        if ctx.attention is None:
            return None
        entry: dict[str, object] = {"loop": k, "layer": layer, "kind": kind}
        if pack is not None:  # probs are (B, H, T_active_max, T); rows are these positions
            entry["positions"] = pack.pos
        log = ctx.attention
        return lambda probs: log.append({**entry, "probs": probs.detach()})

    def _run_plain(self, blocks: nn.ModuleList, x: Tensor, ctx: LoopContext, kind: str) -> Tensor:
        """Blocks outside the loop (prelude/coda): causal attention, nothing cached; loop = -1."""
        cos, sin = self.rotary.tables(x.shape[1])
        kept = ctx.extras.get("plain_kv")
        for i, block in enumerate(blocks):

            def mix(q: Tensor, keys: Tensor, values: Tensor, h: Tensor, i: int = i) -> Tensor:
                if kept is not None:
                    kept[(kind, i)] = (keys, values)
                return self._attend(ctx, -1, i, kind, q, keys, values, None)

            x = block(x, cos, sin, mix)
        return x

    # ----------------------------------------------------------------- cost model
    def flops_per_token_step(self, seq_len: int, k: int = 1) -> float:
        """Approximate FLOPs (2 x multiply-adds) of one ``step`` per token, attention scores and
        the weighted value sum included (causal: on average (T+1)/2 keys per query).

        Args:
            seq_len: sequence length T.
            k: loop index (PLT's loop 0 differs from its later loops); default a later loop.
        """
        if not _is_int(seq_len) or seq_len < 1:
            raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        cfg = self.config
        dim, hidden = cfg.d_model, cfg.mlp_ratio * cfg.d_model
        mlp_mats = 3 if cfg.mlp == "swiglu" else 2
        per_layer = 4 * dim * dim + mlp_mats * dim * hidden
        per_layer += 2 * dim * self._keys_per_query(seq_len, k)  # QK^T and PV
        return 2.0 * (cfg.n_layers * per_layer + self._extra_macs(k))

    def _keys_per_query(self, seq_len: int, k: int) -> float:
        return (seq_len + 1) / 2

    def _extra_macs(self, k: int) -> float:
        """Multiply-adds per token of the step outside the layer stack (adapters, gates)."""
        return 2.0 * self.config.d_model**2 if getattr(self, "adapter", None) is not None else 0.0
