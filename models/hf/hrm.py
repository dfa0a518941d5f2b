"""``HrmLoop``: transformers' native looped model ``HrmTextForCausalLM`` (``hrm_text``), its
high-level cycles as loopscope's loop.

HRM keeps two states: the slow ``z_H`` (starting at the scaled token embeddings) and the fast
``z_L`` (starting at the learned ``z_L_init``). One loopscope step is one H-cycle::

    for l in range(L_cycles): z_L = L_module(z_L + z_H)
    z_H = H_module(z_H + z_L)

and the readout is ``lm_head(z_H)``, so ``forward(tokens, loops=H_cycles)`` is
``HrmTextForCausalLM``'s forward. The loop state is the pair concatenated on the feature axis,
``z = [z_H; z_L]`` of width ``2 * hidden_size`` (``d_model``), so trajectories, residuals and
spectral radii cover both. ``L_bp_cycles`` (training-time gradient routing: early L-cycles of
H-cycle ``h`` run without gradient) is applied as HF does; loops past the list keep one
L-cycle with gradient. Prefix-LM bidirectional blocks (``token_type_ids``) are not supported:
loopscope tasks are causal, so every position attends causally. Token granularity keeps frozen
keys/values per stack invocation of the cycle (see ``models.hf.adapter``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from models.base import LoopContext
from models.hf.adapter import FrozenKV, HFLoopConfig, HFLoopedModel, layer_attention_flops

HRM_TYPES = ("hrm_text",)


class HrmLoop(HFLoopedModel):
    """``HrmTextForCausalLM`` with one H-cycle per loop step; state ``[z_H; z_L]`` (B, T, 2D)."""

    def __init__(self, hf_model: nn.Module) -> None:
        cfg = hf_model.config
        if cfg.model_type not in HRM_TYPES:
            raise ValueError(f"HrmLoop wraps model_type {HRM_TYPES}, got {cfg.model_type!r}")
        config = HFLoopConfig(arch="hf_hrm", model_type=cfg.model_type, vocab_size=cfg.vocab_size,
                              d_model=2 * cfg.hidden_size,
                              max_seq_len=cfg.max_position_embeddings,
                              n_layers=cfg.num_layers_per_stack * (cfg.L_cycles + 1),
                              extra={"H_cycles": cfg.H_cycles, "L_cycles": cfg.L_cycles})
        super().__init__(hf_model, config)
        body = hf_model.model
        self.hook_attention([layer.self_attn for layer in body.L_module.layers])
        self.hook_attention([layer.self_attn for layer in body.H_module.layers])

    @property
    def configured_loops(self) -> int:
        """The checkpoint's own cycle count (``H_cycles``): the depth it was trained at."""
        return int(self.hf.config.H_cycles)

    def loop_modules(self) -> list[nn.Module]:
        """The modules one loop step (an H-cycle) runs: the L and H stacks."""
        return [self.hf.model.L_module, self.hf.model.H_module]

    def prepare(self, tokens: Tensor, *, capture_attention: bool = False) -> LoopContext:
        tokens = self.check_tokens(tokens)
        body = self.hf.model
        batch, seq = tokens.shape
        embeds = body.embed_tokens(tokens) * body.embedding_scale
        position_ids = torch.arange(seq, device=tokens.device).unsqueeze(0)
        ctx = LoopContext(tokens=tokens, inject=embeds)
        ctx.attention = [] if capture_attention else None
        ctx.extras["masks"] = self.hf_masks(embeds, position_ids, eager=capture_attention)
        cos, sin = body.rotary_emb(embeds, position_ids)
        ctx.extras["rope"] = (cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:]))
        return ctx

    def init_state(self, ctx: LoopContext, generator: torch.Generator | None = None) -> Tensor:
        """``[z_H; z_L]`` = [scaled embeddings; z_L_init broadcast].

        Deterministic: ``generator`` (the LoopedModel signature) draws nothing.
        """
        z_l = self.hf.model.z_L_init.to(ctx.inject).expand_as(ctx.inject)
        return torch.cat((ctx.inject, z_l), dim=-1)

    def step(self, z: Tensor, ctx: LoopContext, k: int, active: Tensor | None = None) -> Tensor:
        self.check_step(z, ctx, k)
        skip, pack = self.token_pack(z, ctx, k, active)
        if skip:
            return z
        body, cfg = self.hf.model, self.hf.config
        z_h, z_l = (z if pack is None else pack.gather(z)).chunk(2, dim=-1)
        mask, rope = ctx.extras["masks"]["full_attention"], ctx.extras["rope"]
        if pack is not None:
            mask = self.pack_masks(pack, z.shape[1], z.dtype)["full_attention"]
            rope = (pack.gather(rope[0]), pack.gather(rope[1]))
        kwargs = {"attention_mask": mask, "position_embeddings": rope,
                  "past_key_values": FrozenKV(ctx.cache, pack)}
        padded = body.L_bp_cycles_padded
        grad_from = cfg.L_cycles - (padded[k] if k < len(padded) else 1)
        n = len(body.L_module.layers)
        for low in range(cfg.L_cycles):  # cache slots as HF lays them out within one H-cycle
            no_grad = torch.no_grad() if low < grad_from else contextlib.nullcontext()
            with no_grad, self.recording(ctx, k, "full", layer_base=low * n, pack=pack):
                z_l = body.L_module(z_l + z_h, cycle_offset=low * n, **kwargs)
        with self.recording(ctx, k, "full", layer_base=cfg.L_cycles * n, pack=pack):
            z_h = body.H_module(z_h + z_l, cycle_offset=cfg.L_cycles * n, **kwargs)
        out = torch.cat((z_h, z_l), dim=-1)
        return out if pack is None else pack.scatter(z, out)

    def readout(self, z: Tensor, ctx: LoopContext) -> Tensor:
        return self.hf.lm_head(z[..., : self.d_model // 2])

    def flops_per_token_step(self, seq_len: int) -> float:
        """Approximate FLOPs (2 x multiply-adds) per token of one H-cycle (L_cycles + 1 stacks)."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        cfg = self.hf.config
        gate = cfg.hidden_size * cfg.num_attention_heads * cfg.head_dim  # the sigmoid gate proj
        per_layer = layer_attention_flops(cfg, seq_len) + gate + \
            3 * cfg.hidden_size * cfg.intermediate_size
        return 2.0 * self.config.n_layers * per_layer
