"""A tiny ``LoopedModel`` honouring ``models/base.py``, for testing ``halting`` in isolation.

It is a plain ``LoopedModel`` with no ``ModelConfig``: it implements the declared interface (the
methods and the four properties) and nothing else, as an adapter of a foreign model would.

One causal single-head attention block with input injection,
``z_{k+1} = z + s * (attn(norm(z + e)) + mlp(...))``. At token granularity (``active`` given) it
keeps per-position keys/values in ``ctx.cache["kv"]``: running positions recompute theirs, halted
positions keep the ones from their last computation (the *frozen* policy) and their state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from halting.base import Capabilities, LoopController, StepView
from models.base import LoopContext, LoopedModel


class ToyLoop(LoopedModel):
    """Causal, contractive-ish toy looped block (d_model 32, vocab 16 by default)."""

    def __init__(self, vocab_size: int = 16, d_model: int = 32, max_seq_len: int = 32,
                 halt_token_id: int | None = None, scale: float = 0.5,
                 window: int | None = None) -> None:
        super().__init__()
        self.window = window
        self._vocab_size, self._d_model, self._halt_token_id = vocab_size, d_model, halt_token_id
        self.scale = scale
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(max_seq_len, d_model))
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(),
                                 nn.Linear(2 * d_model, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.halt = nn.Linear(d_model, 1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def d_model(self) -> int:
        return self._d_model

    @property
    def halt_token_id(self) -> int | None:
        return self._halt_token_id

    def prepare(self, tokens: Tensor, *, capture_attention: bool = False) -> LoopContext:
        inject = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return LoopContext(tokens=tokens, inject=inject)

    def init_state(self, ctx: LoopContext, generator: torch.Generator | None = None) -> Tensor:
        return torch.zeros_like(ctx.inject)

    def step(self, z: Tensor, ctx: LoopContext, k: int, active: Tensor | None = None) -> Tensor:
        h = self.norm(z + ctx.inject)
        q, key, value = self.qkv(h).chunk(3, dim=-1)  # each (B, T, D)
        if active is not None:
            cached_k, cached_v = ctx.cache["kv"]
            mask = active.unsqueeze(-1)
            key, value = torch.where(mask, key, cached_k), torch.where(mask, value, cached_v)
        ctx.cache["kv"] = (key, value)
        attn = F.scaled_dot_product_attention(q, key, value, attn_mask=self._mask(z.shape[1], z))
        update = attn + self.mlp(h + attn)
        z_new = z + self.scale * (update - z)
        if active is not None:
            z_new = torch.where(active.unsqueeze(-1), z_new, z)
        return z_new

    def _mask(self, seq_len: int, like: Tensor) -> Tensor:
        """Causal; with ``window`` a position sees only itself and the window-1 before it, so
        information travels at most window-1 positions per loop."""
        pos = torch.arange(seq_len, device=like.device)
        offset = pos.unsqueeze(1) - pos.unsqueeze(0)  # (T, T) query - key
        mask = offset >= 0
        if self.window is not None:
            mask = mask & (offset < self.window)
        return mask

    def readout(self, z: Tensor, ctx: LoopContext) -> Tensor:
        return self.head(z)

    def halt_logit(self, z: Tensor, ctx: LoopContext) -> Tensor:
        return self.halt(z).squeeze(-1)

    def forward(self, tokens: Tensor, loops: int,
                generator: torch.Generator | None = None) -> Tensor:
        ctx = self.prepare(tokens)
        z = self.init_state(ctx)
        for k in range(loops):
            z = self.step(z, ctx, k)
        return self.readout(z, ctx)

    def flops_per_token_step(self, seq_len: int) -> float:
        d = self.d_model
        return 2.0 * (3 * d * d + 4 * d * d + 2 * seq_len * d)


class ScriptedExit(LoopController):
    """Row (token) ``i`` stops after ``plan[i]`` loops: (B,) sample or (B, T) token plan."""

    name = "scripted"

    def __init__(self, plan: Tensor) -> None:
        super().__init__()
        self.plan = plan
        self.capabilities = Capabilities(granularities=("sample",) if plan.dim() == 1
                                         else ("token",))

    def decide(self, view: StepView) -> Tensor:
        return self.plan[view.rows] == view.loops


def count_step_rows(model: LoopedModel, per_token: bool = False) -> list[int]:
    """Wrap ``model.step`` so every call appends the rows it ran (``per_token``: the tokens, i.e.
    the active positions when a mask is passed, else rows x T)."""
    calls: list[int] = []
    original = model.step

    def counted(z: Tensor, ctx: LoopContext, k: int, active: Tensor | None = None) -> Tensor:
        if active is not None:
            calls.append(int(active.sum()))
        else:
            calls.append(z.shape[0] * (z.shape[1] if per_token else 1))
        if active is None:
            return original(z, ctx, k)
        return original(z, ctx, k, active=active)

    model.step = counted
    return calls
