"""``RetrofitLoop``: recurrence retrofitted onto a standard transformers decoder.

The decoder's layers ``[a, b)`` become the looped core; layers ``[0, a)`` are the prelude (run once
in ``prepare``) and ``[b, L)`` the coda (run once in ``readout``, then the final norm and LM head),
as in the recurrent-depth model (REFERENCE.md §1). Input injection, with ``e`` the prelude output:

- ``none``: ``z_0 = e``, each loop ``z = Core(z)``;
- ``add``: ``z_0 = 0``, each loop ``z = Core(z + e)``;
- ``concat``: ``z_0 = 0``, each loop ``z = Core(W [z; e])`` with ``W`` initialised to ``[I I]``.

Every option starts so that one loop reproduces the original model exactly (loop 1 computes
``Core(e)``); more loops reapply the pretrained core. Families: the Llama layout (``llama``,
``mistral``, ``qwen2``, ``qwen3``: rotary position embeddings from the model's own
``rotary_emb``, per-layer full / sliding-window masks) and ``gpt2`` (learned absolute positions
added in the prelude). Token granularity with frozen halted positions: see ``models.hf.adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.base import LoopContext
from models.hf.adapter import FrozenKV, HFLoopConfig, HFLoopedModel, layer_attention_flops
from models.layers import TokenPack

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
RETROFIT_TYPES = (*LLAMA_LIKE, "gpt2")
INJECTIONS = ("none", "add", "concat")


@dataclass
class _Parts:
    """Where a family keeps its pieces inside the ``*ForCausalLM`` module."""

    embed: nn.Module
    positions: nn.Module | None  # gpt2's wpe
    dropout: nn.Module | None  # gpt2's embedding dropout
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module | None  # llama-like rotary_emb
    attention: list[nn.Module]


def _parts(hf_model: nn.Module, model_type: str) -> _Parts:
    if model_type == "gpt2":
        body = hf_model.transformer
        return _Parts(body.wte, body.wpe, body.drop, body.h, body.ln_f, None,
                      [block.attn for block in body.h])
    body = hf_model.model
    return _Parts(body.embed_tokens, None, None, body.layers, body.norm, body.rotary_emb,
                  [layer.self_attn for layer in body.layers])


def _layer_types(hf_config: Any, model_type: str, n_layers: int) -> list[str]:
    """Which mask each layer reads, exactly as that family's ``*Model.forward`` chooses it."""
    if model_type == "mistral":  # every layer reads the sliding mask when a window is set
        kind = "full_attention" if hf_config.sliding_window is None else "sliding_attention"
        return [kind] * n_layers
    types = getattr(hf_config, "layer_types", None)
    return list(types) if types else ["full_attention"] * n_layers


def check_loop_layers(loop_layers: Any, n_layers: int) -> tuple[int, int]:
    """Validate the looped core ``[a, b)`` against a decoder with ``n_layers`` layers."""
    try:
        a, b = (int(v) for v in loop_layers)
        ok = all(not isinstance(v, bool) and int(v) == v for v in loop_layers)
    except (TypeError, ValueError):
        ok = False
    if not ok or not 0 <= a < b <= n_layers:
        raise ValueError(f"loop_layers must be [a, b) with 0 <= a < b <= {n_layers} (the "
                         f"model's num_hidden_layers), got {loop_layers!r}")
    return a, b


class RetrofitLoop(HFLoopedModel):
    """A decoder's layers ``[a, b)`` looped between its prelude ``[0, a)`` and coda ``[b, L)``."""

    def __init__(self, hf_model: nn.Module, loop_layers: Any, injection: str = "none") -> None:
        hf_config = hf_model.config
        model_type = hf_config.model_type
        if model_type not in RETROFIT_TYPES:
            raise ValueError(f"model_type {model_type!r} cannot be retrofitted; supported: "
                             f"{', '.join(RETROFIT_TYPES)}")
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
        parts = _parts(hf_model, model_type)
        a, b = check_loop_layers(loop_layers, len(parts.layers))
        config = HFLoopConfig(arch="hf_retrofit", model_type=model_type,
                              vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size,
                              max_seq_len=hf_config.max_position_embeddings, loop_layers=(a, b),
                              injection=injection, n_layers=b - a)
        super().__init__(hf_model, config)
        self._p = parts
        self.layer_types = _layer_types(hf_config, model_type, len(parts.layers))
        dim = hf_config.hidden_size
        self.adapter = nn.Linear(2 * dim, dim, bias=False) if injection == "concat" else None
        if self.adapter is not None:  # [I I]: z + e at init, so loop 1 is the original model
            with torch.no_grad():
                eye = torch.eye(dim, dtype=self.adapter.weight.dtype)
                self.adapter.weight.copy_(torch.cat([eye, eye], dim=1))
            self.adapter.to(self.param_dtype)
        self.hook_attention(parts.attention)

    # -- the interface -----------------------------------------------------------------------
    def prepare(self, tokens: Tensor, *, capture_attention: bool = False) -> LoopContext:
        tokens = self.check_tokens(tokens)
        batch, seq = tokens.shape
        position_ids = torch.arange(seq, device=tokens.device).unsqueeze(0)  # (1, T) as HF
        x = self._p.embed(tokens)
        if self._p.positions is not None:
            x = x + self._p.positions(position_ids)
            x = self._p.dropout(x)
        ctx = LoopContext(tokens=tokens, inject=x)
        ctx.attention = [] if capture_attention else None
        ctx.extras["masks"] = self.hf_masks(x, position_ids, eager=capture_attention)
        ctx.extras["position_ids"] = position_ids.expand(batch, seq)
        if self._p.rotary is not None:
            cos, sin = self._p.rotary(x, position_ids)
            ctx.extras["rope"] = (cos.expand(batch, *cos.shape[1:]),
                                  sin.expand(batch, *sin.shape[1:]))
        a, _ = self.config.loop_layers
        with self.recording(ctx, -1, "prelude"):
            ctx.inject = self._run(range(0, a), x, ctx)
        return ctx

    def init_state(self, ctx: LoopContext, generator: torch.Generator | None = None) -> Tensor:
        """``e`` (no injection) or zeros (``add`` / ``concat``), so loop 1 is ``Core(e)``.

        Deterministic: ``generator`` (the LoopedModel signature) draws nothing.
        """
        if self.config.injection == "none":
            return ctx.inject.clone()
        return torch.zeros_like(ctx.inject)

    def step(self, z: Tensor, ctx: LoopContext, k: int, active: Tensor | None = None) -> Tensor:
        self.check_step(z, ctx, k)
        skip, pack = self.token_pack(z, ctx, k, active)
        if skip:
            return z
        state = z if pack is None else pack.gather(z)
        inject = ctx.inject if pack is None else pack.gather(ctx.inject)
        injection = self.config.injection
        if injection == "add":
            x = state + inject
        elif injection == "concat":
            x = self.adapter(torch.cat((state, inject.to(z.dtype)), dim=-1))
        else:
            x = state
        a, b = self.config.loop_layers
        with self.recording(ctx, k, "full", layer_base=-a, pack=pack):
            y = self._run(range(a, b), x, ctx, pack, FrozenKV(ctx.cache, pack))
        return y if pack is None else pack.scatter(z, y)

    def readout(self, z: Tensor, ctx: LoopContext) -> Tensor:
        _, b = self.config.loop_layers
        with self.recording(ctx, -1, "coda", layer_base=-b):
            h = self._run(range(b, len(self._p.layers)), z, ctx)
        return self.hf.lm_head(self._p.norm(h))

    def flops_per_token_step(self, seq_len: int) -> float:
        """Approximate FLOPs (2 x multiply-adds) per token of one loop of the core."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        cfg = self.hf.config
        dim = cfg.hidden_size
        if self.config.model_type == "gpt2":
            mlp = 2 * dim * (getattr(cfg, "n_inner", None) or 4 * dim)
        else:
            mlp = 3 * dim * cfg.intermediate_size
        adapter = 2 * dim * dim if self.adapter is not None else 0
        per_layer = layer_attention_flops(cfg, seq_len) + mlp
        return 2.0 * (self.config.n_layers * per_layer + adapter)

    def loop_modules(self) -> list[nn.Module]:
        """The modules one loop step runs: decoder layers ``[a, b)`` and the concat adapter."""
        a, b = self.config.loop_layers
        return [*self._p.layers[a:b], *([self.adapter] if self.adapter is not None else [])]

    # -- the layer runs ----------------------------------------------------------------------
    def _run(self, indices: range, x: Tensor, ctx: LoopContext, pack: TokenPack | None = None,
             kv: FrozenKV | None = None) -> Tensor:
        """Decoder layers ``indices`` on ``x`` with the masks / positions prepared in ``ctx``
        (gathered at the packed positions when ``pack`` is given)."""
        masks, rope = ctx.extras["masks"], ctx.extras.get("rope")
        position_ids = ctx.extras["position_ids"]
        if pack is not None:
            masks = self.pack_masks(pack, ctx.tokens.shape[1], x.dtype)
            position_ids = pack.pos
            rope = None if rope is None else (pack.gather(rope[0]), pack.gather(rope[1]))
        for i in indices:
            layer = self._p.layers[i]
            mask = masks[self.layer_types[i]]
            if rope is None:  # gpt2: positions were added to the embeddings
                x = layer(x, attention_mask=mask, past_key_values=kv)
            else:
                x = layer(x, attention_mask=mask, position_embeddings=rope,
                          position_ids=position_ids, past_key_values=kv)
            if isinstance(x, tuple):  # some layers still return (hidden, ...)
                x = x[0]
        return x
