"""The ``LoopedModel`` step interface every architecture implements, and its ``LoopContext``.

Data flow (DESIGN.md)::

    ctx = model.prepare(tokens)          # embeddings, prelude output, masks
    z   = model.init_state(ctx)          # (B, T, D)
    for k in range(loops):               # k starts at 0
        z = model.step(z, ctx, k)        # one application of the shared block
    logits = model.readout(z, ctx)       # (B, T, V)

Controllers (``halting``) drive the loop; they may run ``step`` on a subset of batch rows by
passing ``ctx.select(rows)`` and the matching rows of ``z`` (sample-granularity compaction), or
pass ``active`` — a (B, T) bool mask — for token granularity: only active positions are computed;
inactive positions keep their input state exactly and stay visible to the others as context
through the per-layer keys/values cached the last time they were computed (the *frozen* policy).

What a ``LoopedModel`` must expose
----------------------------------
This is everything code outside ``models/`` (``halting``, ``experiments``) may use, so an adapter
of a foreign model (e.g. a Hugging Face causal LM whose middle layers are looped) implements
exactly this and nothing more. It is an ``nn.Module`` (``parameters``, ``train``/``eval``,
``state_dict``) with:

``prepare(tokens, *, capture_attention=False) -> LoopContext``
    ``tokens`` (B, T) int64. Builds what every step reads besides the state. ``ctx.inject``
    (B, T, D) is required (the state has its shape, dtype and device); other per-batch tensors go
    into ``ctx.cache`` / ``ctx.extras`` (batch-first, so ``select`` slices them). With
    ``capture_attention`` set ``ctx.attention = []`` and append records to it (see
    ``LoopContext``); an adapter may leave it ``None`` (attention diagnostics are then skipped).
``init_state(ctx, generator=None) -> Tensor``
    z_0 (B, T, D). A random initial state (``recurrent_depth``) draws from ``generator`` (a
    ``torch.Generator`` on the state's device) when given, else from torch's global RNG;
    deterministic models accept and ignore it. ``run_loop(..., generator=g)`` passes it on.
``step(z, ctx, k, active=None) -> Tensor``
    One application of the looped block; ``k`` is the 0-based loop index. Must work on any
    subset of rows: ``step(z[rows], ctx.select(rows), k)`` (sample-granularity compaction).
    ``active`` (B, T) bool (token granularity): compute only the active positions and return the
    inactive ones unchanged; a model that cannot save that compute may compute every position
    and return ``torch.where(active[..., None], new, z)`` (correct, without the savings). Loop 0
    always runs on the full batch, so a step may write ``ctx.cache`` there.
``readout(z, ctx) -> Tensor``
    (B, T, V) logits of a state.
``halt_logit(z, ctx) -> Tensor``
    (B, T) logit of the learned exit gate (``act``, ``pondernet``, ``ouro_gate``); a model without
    one raises ``NotImplementedError`` and those controllers cannot run on it.
``forward(tokens, loops, generator=None) -> Tensor``
    ``readout`` after ``loops`` steps from ``init_state``; must equal
    ``run_loop(model, tokens, "fixed", max_loops=loops).logits``.
``flops_per_token_step(seq_len) -> float``
    Approximate FLOPs of one ``step`` per token; ``NotImplementedError`` is allowed (FLOP columns
    are then NaN).

and four read-only properties: ``vocab_size`` (V), ``d_model`` (D), ``halt_token_id`` (the
reserved token ``halt_token`` reads, or ``None``) and ``nilpotent_step`` (see below). The base
class implements them from ``self.config`` (the ``ModelConfig`` of the built architectures); an
adapter without a ``ModelConfig`` overrides them. Nobody outside ``models/`` reads
``model.config``.

``LoopContext`` is a dataclass; an adapter may subclass it to add fields, as long as ``select``
keeps slicing every batch-first tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from models.config import ModelConfig


@dataclass
class LoopContext:
    """Everything a loop step reads besides the state.

    Attributes:
        tokens: (B, T) int64 token ids.
        inject: (B, T, D) what each loop reads from the input (token embeddings or prelude output).
        cache: batch-first tensors filled during the loop (e.g. PLT's loop-1 keys/values, the
            frozen-token KV cache). ``select`` slices every entry along dim 0.
        attention: when not ``None``, each attention call appends
            ``{"loop": k, "layer": i, "kind": "full"|"global"|"local", "probs": (B, H, T, T)}``.
        extras: any other per-batch tensors (batch-first) an architecture needs.
    """

    tokens: Tensor
    inject: Tensor
    cache: dict[str, Any] = field(default_factory=dict)
    attention: list[dict[str, Any]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: Tensor) -> LoopContext:
        """A context for the batch rows ``rows`` (LongTensor of indices); caches are sliced.

        The returned context shares no writable cache with ``self``: steps that write the cache
        (PLT loop 1) must run on the full batch, which ``run_loop`` guarantees (every row runs
        loop 0).
        """
        return replace(
            self,
            tokens=self.tokens[rows],
            inject=self.inject[rows],
            cache=_index_tree(self.cache, rows),
            extras=_index_tree(self.extras, rows),
        )


def _index_tree(tree: Any, rows: Tensor) -> Any:
    if isinstance(tree, Tensor):
        return tree[rows]
    if isinstance(tree, dict):
        return {key: _index_tree(value, rows) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_index_tree(value, rows) for value in tree)
    return tree


class LoopedModel(nn.Module):
    """Base class: one shared block applied ``loops`` times between an input map and a readout.

    The interface callers may use is listed in the module docstring ("What a LoopedModel must
    expose").
    """

    config: ModelConfig

    def prepare(self, tokens: Tensor, *, capture_attention: bool = False) -> LoopContext:
        raise NotImplementedError

    def init_state(self, ctx: LoopContext, generator: torch.Generator | None = None) -> Tensor:
        """z_0 (B, T, D); a random one draws from ``generator`` when given."""
        raise NotImplementedError

    def step(self, z: Tensor, ctx: LoopContext, k: int, active: Tensor | None = None) -> Tensor:
        """One application of the looped block. ``k`` is the 0-based loop index."""
        raise NotImplementedError

    def readout(self, z: Tensor, ctx: LoopContext) -> Tensor:
        """(B, T, V) logits of the state ``z``."""
        raise NotImplementedError

    def halt_logit(self, z: Tensor, ctx: LoopContext) -> Tensor:
        """(B, T) exit-gate logit at the state ``z`` (learned halting)."""
        raise NotImplementedError

    def forward(self, tokens: Tensor, loops: int,
                generator: torch.Generator | None = None) -> Tensor:
        """``readout`` after ``loops`` steps from ``init_state(ctx, generator)``."""
        raise NotImplementedError

    def flops_per_token_step(self, seq_len: int) -> float:
        """Approximate multiply-add FLOPs (x2) of one ``step`` per token at this sequence length."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- what callers may read besides the methods (an adapter of a foreign model implements
    # these; nobody reads ``model.config`` fields directly) ------------------------------------
    @property
    def vocab_size(self) -> int:
        """Size of the output vocabulary V (``readout`` returns (B, T, V))."""
        return self.config.vocab_size

    @property
    def d_model(self) -> int:
        """Width D of the loop state z (B, T, D)."""
        return self.config.d_model

    @property
    def halt_token_id(self) -> int | None:
        """The reserved vocabulary id read as a halting probability, or ``None`` (no halt token)."""
        return self.config.halt_token_id

    @property
    def nilpotent_step(self) -> bool:
        """Whether ``step`` reads the previous state only through a strictly causal shift.

        Then the step's Jacobian is strictly lower-triangular over positions (nilpotent), so
        every trajectory is exactly fixed after at most ``T`` loops and its spectral radius is 0
        — a property of the architecture, not a sign of a bug (PLT with cross-loop position
        offset). Reports and verdicts read this instead of branching on the architecture name.
        """
        return False
