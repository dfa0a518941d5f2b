"""Decoding without a key/value cache, for looped models that have no ``models.decoding`` interface.

The Hugging Face adapters (``models.hf``) and any user ``LoopedModel`` implement ``prepare /
init_state / step / readout`` but not the per-(loop, layer) decode cache. ``generate`` still works
on them through this path: each new token re-runs ``run_loop(granularity="token")`` on the whole
sequence so far (right-padded; a causal model's real positions never read the padding after them)
and takes each row's last real position. Its logits and depth are therefore exactly those of the
full-sequence evaluation (the ``frozen`` token policy included), but nothing is cached: token t
costs a full forward over t positions, and ``executed`` counts every recomputed token-loop, so the
output says honestly what this path spent. ``mode`` is ``"uncached"``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from halting.base import LoopController
from halting.decoder import GenerateOutput, assemble_output, sample_tokens
from halting.loop import run_loop


class UncachedDecoder:
    """One ``generate`` call on a model without a decode cache (see the module docstring)."""

    def __init__(self, model: nn.Module, controller: LoopController, prompts: list[Tensor],
                 loops: int, max_new: int, generator: torch.Generator | None) -> None:
        self.model, self.controller, self.loops = model, controller, loops
        self.max_new, self.generator = max_new, generator
        self.device = model.device
        self.prompts = prompts
        self.batch = len(prompts)
        self.lengths = torch.tensor([int(p.numel()) for p in prompts], device=self.device)
        self.executed = 0

    def _run(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, V) logits and (B, T) depth of the whole right-padded sequence."""
        out = run_loop(self.model, tokens, self.controller, max_loops=self.loops,
                       granularity="token", mode="eval", generator=self.generator)
        self.executed += int(out.executed)
        return out.logits, out.depth

    def generate(self, temperature: float, top_k: int | None, stops: set[int], pad: int,
                 return_logits: bool) -> GenerateOutput:
        longest = int(self.lengths.max()) + max(self.max_new - 1, 0)
        tokens = torch.full((self.batch, longest), pad, dtype=torch.long, device=self.device)
        for b, row in enumerate(self.prompts):
            tokens[b, : row.numel()] = row.to(self.device)
        rows = torch.arange(self.batch, device=self.device)
        width = int(self.lengths.max())
        logits, depth = self._run(tokens[:, :width])  # the prompt runs even for 0 new tokens
        valid = torch.arange(width, device=self.device) < self.lengths.unsqueeze(1)
        prompt_depth = torch.where(valid, depth, 0)
        last = self.lengths - 1

        def advance(token: Tensor, step: int) -> tuple[Tensor, Tensor]:
            at = last + step + 1
            tokens[rows, at] = token
            logits, depth = self._run(tokens[:, :width + step + 1])
            return logits[rows, at], depth[rows, at]

        made, depths, kept, stop_ids = sample_tokens(
            (logits[rows, last], depth[rows, last]), advance, max_new=self.max_new,
            temperature=temperature, top_k=top_k, generator=self.generator, stops=stops,
            pad=pad, return_logits=return_logits)
        return self._output(made, depths, kept, prompt_depth, return_logits, stop_ids)

    def _output(self, made: list[Tensor], depths: list[Tensor], kept: list[Tensor],
                prompt_depth: Tensor, return_logits: bool, stop_ids: Tensor) -> GenerateOutput:
        return assemble_output(self.model, self.batch, made, depths, kept, prompt_depth,
                               self.lengths, return_logits, stop_ids, executed=self.executed,
                               mode="uncached", max_loops=self.loops, cache_bytes=0)
