"""``ModelConfig``: one typed, documented config for every looped architecture.

Fields that only one architecture reads say so. Unknown fields are rejected by
``ModelConfig.from_dict`` / ``build_model`` (torchdeq silently ignores unknown keys; we do not).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

ARCHS = ("parallel_loop", "serial_loop", "recurrent_depth", "deq")
GATE_MODES = ("hidden", "query", "fixed")
INJECTIONS = ("none", "add", "concat")
DEQ_NORMS = ("none", "weight", "spectral")
MLPS = ("swiglu", "gelu")


@dataclass
class ModelConfig:
    """Configuration of a looped transformer.

    Attributes:
        arch: one of ``parallel_loop``, ``serial_loop``, ``recurrent_depth``, ``deq``.
        vocab_size: number of token ids; valid ids are ``0 .. vocab_size-1``.
        max_seq_len: longest sequence ``prepare`` accepts (rotary tables are built to this length).
        d_model: width of the residual stream (the loop state has shape (B, T, d_model)).
        n_heads: attention heads; ``d_model`` must be divisible by it.
        n_layers: transformer blocks inside the looped (shared) block.
        mlp_ratio: MLP hidden width = ``mlp_ratio * d_model``.
        mlp: ``swiglu`` (Shazeer 2020) or ``gelu`` feed-forward.
        dropout: dropout probability inside blocks (0 disables).
        rope_base: rotary embedding base.
        tie_embeddings: share the token embedding with the LM head.
        halt_token_id: a reserved vocabulary id whose LM-head probability acts as the halting
            probability for the ``halt_token`` controller; ``None`` = the model has no halt token.
        attention: ``sdpa`` (fused fast path, default) or ``math`` (explicit softmax; needed for
            forward-mode AD through attention and used automatically when capturing attention).
        clp: parallel_loop only — cross-loop position offset: loop r>=2 input at t mixes E_t with
            norm(H^(r-1)_{t-1}).
        clp_a, clp_b: parallel_loop only — the mixing weights a·E_t + b·norm(H_{t-1}).
        shared_kv: parallel_loop only — loops r>=2 read loop 1's full-length KV (global branch).
        gate_mode: parallel_loop only — ``hidden`` (sigmoid of a linear map of RMSNorm(x)),
            ``query`` (of the post-RoPE query) or ``fixed`` (0.5).
        window: parallel_loop only — sliding-window size of the local attention in loops r>=2:
            position t sees its own loop's keys at t-window+1 .. t (must be <= max_seq_len).
        loop_embedding: serial_loop only — add a learned loop-index embedding each loop.
        max_loop_embeddings: serial_loop only — size of that embedding table (indices are clamped).
        injection: serial_loop: ``none`` (state starts at the embeddings), ``add``
            (Y_t = M(Y_{t-1} + P)) or ``concat``; recurrent_depth/deq need ``concat`` (Huginn
            adapter Linear(2d -> d) on [s; e]) or ``add``. parallel_loop ignores it (CLP is its
            injection).
        prelude_layers, coda_layers: recurrent_depth only — blocks before / after the loop.
        init_scale: recurrent_depth only — std of the truncated-normal random initial state.
        residual_scale: deq only — scale on each residual branch (smaller = more contractive).
        deq_norm: deq only — ``none``, ``weight`` or ``spectral`` normalisation of the block's
            linear maps (torchdeq's ``apply_norm``).
    """

    arch: str = "parallel_loop"
    vocab_size: int = 64
    max_seq_len: int = 256
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    mlp_ratio: int = 4
    mlp: str = "swiglu"
    dropout: float = 0.0
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    halt_token_id: int | None = None
    attention: str = "sdpa"
    # parallel_loop
    clp: bool = True
    clp_a: float = 0.707
    clp_b: float = 0.707
    shared_kv: bool = True
    gate_mode: str = "hidden"
    window: int = 64
    # serial_loop
    loop_embedding: bool = False
    max_loop_embeddings: int = 64
    injection: str = "add"
    # recurrent_depth
    prelude_layers: int = 1
    coda_layers: int = 1
    init_scale: float = 1.0
    # deq
    residual_scale: float = 0.5
    deq_norm: str = "spectral"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a mapping; unknown keys raise a ``KeyError`` naming the known ones."""
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(
                f"unknown ModelConfig field(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ``ValueError``/``KeyError`` naming the bad value and what is allowed."""
        from models.looped import ARCH_REGISTRY  # here: looped imports this module

        # the registry, not a fixed list: a new architecture is its module alone
        if self.arch not in ARCH_REGISTRY:
            known = [*ARCHS, *(name for name in ARCH_REGISTRY if name not in ARCHS)]
            raise KeyError(f"unknown architecture {self.arch!r}; known: {', '.join(known)}")

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "n_layers", "mlp_ratio",
                     "window", "max_loop_embeddings"):
            positive(name)
        for name in ("prelude_layers", "coda_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head size d_model/n_heads={self.d_model // self.n_heads} must be even (rotary)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.halt_token_id is not None and not 0 <= self.halt_token_id < self.vocab_size:
            raise ValueError(
                f"halt_token_id={self.halt_token_id} must be in [0, {self.vocab_size - 1}] or None"
            )
        if self.attention not in ("sdpa", "math"):
            raise ValueError(f"attention must be 'sdpa' or 'math', got {self.attention!r}")
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {self.gate_mode!r}")
        if self.injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {self.injection!r}")
        if self.arch in ("recurrent_depth", "deq") and self.injection == "none":
            raise ValueError(
                f"injection='none' is not allowed for arch={self.arch!r} (its loop must read the"
                " input); use 'concat' or 'add'"
            )
        if self.arch == "parallel_loop" and self.window > self.max_seq_len:
            raise ValueError(
                f"window={self.window} must be <= max_seq_len={self.max_seq_len}"
            )
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        for name in ("clp_a", "clp_b", "dropout", "rope_base", "init_scale", "residual_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value):
                raise ValueError(f"{name} must be a finite real number, got {value!r}")
        # frequencies base**(-2i/d) must fall with i (the rotary scheme); base <= 0 gives NaN
        if self.rope_base <= 1:
            raise ValueError(f"rope_base must be a number > 1, got {self.rope_base!r}")
        if self.deq_norm not in DEQ_NORMS:
            raise ValueError(f"deq_norm must be one of {DEQ_NORMS}, got {self.deq_norm!r}")
        if self.init_scale < 0:
            raise ValueError(f"init_scale must be >= 0, got {self.init_scale!r}")
        if not 0.0 < self.residual_scale <= 1.0:
            raise ValueError(f"residual_scale must be in (0, 1], got {self.residual_scale!r}")
