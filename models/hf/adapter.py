"""``HFLoopedModel``: what every transformers adapter shares (token checks, the model's own masks,
attention capture, the halting head, the small adapter config).

The wrapped ``transformers`` model stays intact as ``self.hf`` (so ``save_pretrained`` writes a
checkpoint transformers itself can load); the adapter only decides which of its modules run per
loop. Masks come from transformers' own ``create_causal_mask`` /
``create_sliding_window_causal_mask`` for the model's configured attention implementation
(``eager`` or ``sdpa``); attention capture switches that implementation to ``eager`` for the
captured call only (fused kernels return no probabilities) and records each attention module's
returned weights through a forward hook.

Token granularity, *frozen* policy (``step(..., active=mask)``): the active positions of each row
are packed (``models.layers.TokenPack``) and only they run through the looped layers. The layers
receive a ``FrozenKV`` as their ``past_key_values``: transformers' attention modules hand it each
layer's fresh keys/values through ``Cache.update``, and it returns them merged into the ones cached
for every position the last time it was computed (full steps store them by reference, no copy).
So halted positions keep their state exactly and stay visible as context, as in ``TransformerLoop``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.base import LoopContext, LoopedModel
from models.layers import RMSNorm, TokenPack

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
HALT_BIAS_INIT = -2.0  # same start as TransformerLoop's exit gate: sigmoid(-2) ~= 0.12


@dataclass
class HFLoopConfig:
    """What loopscope callers read about an adapted model (the HF config lives on ``model.hf``).

    Attributes:
        arch: ``hf_retrofit`` or ``hf_hrm``.
        model_type: the transformers ``model_type`` (``llama``, ``qwen2``, ``hrm_text``, ...).
        vocab_size, d_model, max_seq_len: sizes (``d_model`` is the loop-state width).
        halt_token_id: always ``None`` (no reserved halt token in a foreign vocabulary).
        loop_layers: retrofit only — the looped core ``[a, b)`` of decoder layers.
        injection: retrofit only — ``none``, ``add`` or ``concat``.
        n_layers: decoder layers run per loop step.
    """

    arch: str
    model_type: str
    vocab_size: int
    d_model: int
    max_seq_len: int
    halt_token_id: int | None = None
    loop_layers: tuple[int, int] | None = None
    injection: str = "none"
    n_layers: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["loop_layers"] = None if self.loop_layers is None else list(self.loop_layers)
        return values


class HFLoopedModel(LoopedModel):
    """Base of the transformers adapters; subclasses implement prepare/init_state/step/readout."""

    def __init__(self, hf_model: nn.Module, config: HFLoopConfig) -> None:
        super().__init__()
        self.hf = hf_model
        self.config = config  # type: ignore[assignment]  # HFLoopConfig, not ModelConfig
        self.halt_norm = RMSNorm(config.d_model)
        self.halt_head = nn.Linear(config.d_model, 1)
        nn.init.normal_(self.halt_head.weight, 0.0, 0.02)
        nn.init.constant_(self.halt_head.bias, HALT_BIAS_INIT)
        self.param_dtype = next(hf_model.parameters()).dtype  # a bf16 checkpoint stays bf16
        self.halt_norm.to(self.param_dtype)
        self.halt_head.to(self.param_dtype)
        self._record: Callable[[str, Tensor], None] | None = None

    # vocab_size and d_model come from LoopedModel (read off ``self.config``); a foreign
    # checkpoint has no reserved halt token.
    @property
    def halt_token_id(self) -> int | None:
        return None

    @property
    def max_seq_len(self) -> int:
        """Longest sequence ``prepare`` accepts (the model's ``max_position_embeddings``)."""
        return self.config.max_seq_len

    # -- shared pieces ---------------------------------------------------------------------
    def check_tokens(self, tokens: object) -> Tensor:
        """Reject anything but an int (B, T) tensor of in-range ids on the model's device."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of ids, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids (int64), got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise ValueError(f"tokens must have non-empty shape (B, T), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length T={tokens.shape[1]} exceeds the model's "
                             f"max_position_embeddings={self.max_seq_len}")
        if tokens.device != self.device:
            raise ValueError(f"tokens are on device {tokens.device} but the model is on "
                             f"{self.device}; move them with tokens.to(device)")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} outside [0, {self.vocab_size}) "
                             "(vocab_size)")
        return tokens.long()

    @staticmethod
    def check_loops(loops: object) -> int:
        if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
            raise ValueError(f"loops must be an integer >= 1, got {loops!r}")
        return loops

    def check_step(self, z: Tensor, ctx: LoopContext, k: object) -> None:
        """Reject a bad loop index or a state whose shape does not match the context."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"loop index k must be an integer >= 0, got {k!r}")
        want = (*ctx.tokens.shape, self.d_model)
        if not isinstance(z, Tensor) or tuple(z.shape) != want:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"state z must have shape {want} (B, T, d_model), got {got}")

    def token_pack(self, z: Tensor, ctx: LoopContext, k: int, active: Tensor | None
                   ) -> tuple[bool, TokenPack | None]:
        """``(skip, pack)`` for a step: skip when no position is active; ``pack`` the packed
        active positions for a partial mask (``None``: compute every position)."""
        if active is None:
            return False, None
        if active.dtype != torch.bool or active.shape != z.shape[:2]:
            raise ValueError(f"active must be a bool mask of shape {tuple(z.shape[:2])} (B, T), "
                             f"got {active.dtype} {tuple(active.shape)}")
        fewest, most = torch.stack(torch.aminmax(active.sum(dim=1))).tolist()  # one host sync
        if fewest == active.shape[1]:
            return False, None
        if most == 0:
            return True, None
        if not any(name.startswith("hf_kv.") for name in ctx.cache):
            raise ValueError(f"step k={k} with a partial `active` mask needs the keys/values of a "
                             "previous full step in ctx.cache; run a step with active=None first")
        return False, TokenPack.from_mask(active, (fewest, most))

    def pack_masks(self, pack: TokenPack, seq_len: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """Masks of packed queries over all ``seq_len`` keys per attention type, in the format
        the current attention implementation reads (bool for sdpa, additive for eager)."""
        window = getattr(self.hf.config, "sliding_window", None)
        eager = self.hf.config._attn_implementation == "eager"

        def fmt(mask: Tensor) -> Tensor:
            if not eager:
                return mask
            zero = torch.zeros((), dtype=dtype, device=mask.device)
            return torch.where(mask, zero, torch.finfo(dtype).min)

        return {"full_attention": fmt(pack.key_mask(seq_len)),
                "sliding_attention": fmt(pack.key_mask(seq_len, window))}

    def hf_masks(self, embeds: Tensor, position_ids: Tensor, eager: bool) -> dict[str, Any]:
        """The model's own 4-D masks per attention type, batch-first so ``ctx.select`` slices them.

        ``position_ids`` is (1, T) exactly as the HF forward builds it (so the sdpa path may
        return ``None`` and let the kernel apply causality, as HF does).
        """
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        config = self.hf.config
        kwargs = {"config": config, "inputs_embeds": embeds, "attention_mask": None,
                  "past_key_values": None, "position_ids": position_ids}
        with self.attn_implementation("eager" if eager else None):
            masks = {"full_attention": create_causal_mask(**kwargs)}
            if getattr(config, "sliding_window", None) is not None:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        batch = embeds.shape[0]
        return {name: _batch_first(mask, batch) for name, mask in masks.items()}

    @contextlib.contextmanager
    def attn_implementation(self, name: str | None) -> Iterator[None]:
        """Temporarily run the wrapped model with attention implementation ``name`` (None: as is).

        The attention modules read ``config._attn_implementation`` on every call, so switching
        the one shared config object switches them all.
        """
        config = self.hf.config
        before = config._attn_implementation
        if name is None or name == before:
            yield
            return
        config._attn_implementation = name
        try:
            yield
        finally:
            config._attn_implementation = before

    @contextlib.contextmanager
    def recording(self, ctx: LoopContext, loop: int, kind: str, layer_base: int = 0,
                  pack: TokenPack | None = None) -> Iterator[None]:
        """Route attention weights of the next calls into ``ctx.attention`` (if capturing); with
        a ``pack`` the probabilities' rows are the packed positions (entry ``positions``)."""
        if ctx.attention is None:
            yield
            return
        log = ctx.attention
        extra = {} if pack is None else {"positions": pack.pos}

        def record(layer: int, probs: Tensor) -> None:
            log.append({"loop": loop, "layer": layer_base + layer, "kind": kind, **extra,
                        "probs": probs.detach()})

        self._record = record  # type: ignore[assignment]
        try:
            with self.attn_implementation("eager"):
                yield
        finally:
            self._record = None

    def hook_attention(self, modules: list[nn.Module]) -> None:
        """Forward hooks on attention modules: hand their returned weights to ``_record``."""
        for index, module in enumerate(modules):

            def hook(_mod: nn.Module, _args: Any, output: Any, index: int = index) -> None:
                if self._record is not None and isinstance(output, tuple) and \
                        isinstance(output[1], Tensor):
                    self._record(index, output[1])  # type: ignore[call-arg]

            module.register_forward_hook(hook)

    def halt_logit(self, z: Tensor, ctx: LoopContext) -> Tensor:
        """Exit-gate logit (B, T): Linear(D, 1) on RMSNorm(z), bias initialised to -2 (untrained
        on a loaded checkpoint: train it, or use a controller that needs no head)."""
        return self.halt_head(self.halt_norm(z)).squeeze(-1)

    def forward(self, tokens: Tensor, loops: int) -> Tensor:
        loops = self.check_loops(loops)
        ctx = self.prepare(tokens)
        z = self.init_state(ctx)
        for k in range(loops):
            z = self.step(z, ctx, k)
        return self.readout(z, ctx)

    def loop_modules(self) -> list[nn.Module]:
        """The modules one ``step`` runs (``trainable=loop`` trains them and the halting head)."""
        raise NotImplementedError

    def adapter_state(self) -> dict[str, Tensor]:
        """The weights that are the adapter's own (not the HF model's), for saving."""
        return {name: t for name, t in self.state_dict().items() if not name.startswith("hf.")}


class FrozenKV:
    """The ``past_key_values`` a looped step hands transformers' attention modules.

    It implements the one ``Cache`` method they call, ``update(keys, values, slot)``: on a full
    step it stores each slot's (B, H_kv, T, hd) keys/values in ``store`` (``ctx.cache``, so
    ``ctx.select`` slices them with their rows) and returns them unchanged; on a packed step it
    writes the fresh keys/values of the packed positions over the stored ones and returns the
    merged full-length tensors, so queries see halted positions as they were last computed.
    """

    def __init__(self, store: dict[str, Any], pack: TokenPack | None) -> None:
        self.store, self.pack = store, pack

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        name = f"hf_kv.{layer_idx}"
        if self.pack is not None:
            old_keys, old_values = self.store[name]
            keys = self.pack.scatter_heads(old_keys, keys)
            values = self.pack.scatter_heads(old_values, values)
        self.store[name] = (keys, values)
        return keys, values


def _batch_first(mask: Any, batch: int) -> Any:
    if isinstance(mask, Tensor) and mask.shape[0] != batch:
        return mask.expand(batch, *mask.shape[1:])
    return mask


def layer_attention_flops(hf_config: Any, seq_len: int) -> float:
    """Multiply-adds per token of one attention layer (projections, scores, value sum)."""
    dim = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or dim // heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    projections = dim * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v
    return projections + 2 * heads * head_dim * (seq_len + 1) / 2
