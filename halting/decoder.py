"""The decode loop behind ``halting.generate``: prefill, then one token at a time.

``Decoder`` drives a ``models.decoding`` model and a controller; the policies (right padding,
frozen exits, parallel PLT decode) are described in ``halting.generate``. Everything the
controller protocol needs (``begin`` / ``decide`` / ``finish``) goes through ``_begin``,
``_decide`` and ``_finish`` below, so a change of that protocol is a change here only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from halting.base import LoopController, LoopDraft, RunState, StepView
from models.base import LoopContext
from models.kv_cache import DecodePositions


@dataclass
class GenerateOutput:
    """What ``generate`` returns.

    Attributes:
        tokens: (B, N) generated ids; ``pad_token_id`` after a row produced a stop token.
        depth: (B, N) loops run at the position whose readout produced each token (0 after stop).
        lengths: (B,) tokens generated per row, the stop token included.
        prompt_lengths: (B,) prompt lengths.
        prompt_depth: (B, L) loops each prompt position ran (0 at padding).
        logits: (B, N, V) the logits each token was chosen from, when ``return_logits``.
        executed: token-loops computed (prefill and decode), the compute an exit saves.
        mode: ``parallel`` or ``sequential``.
        max_loops: the loop cap of this run (the controller's planned loops).
        cache_bytes: bytes of the key/value cache.
    """

    tokens: Tensor
    depth: Tensor
    lengths: Tensor
    prompt_lengths: Tensor
    prompt_depth: Tensor
    logits: Tensor | None
    executed: int
    mode: str
    max_loops: int
    cache_bytes: int

    def sequences(self) -> list[list[int]]:
        """Each row's generated ids up to and including its stop token."""
        return [self.tokens[b, : int(self.lengths[b])].tolist() for b in range(len(self.lengths))]

    @property
    def mean_depth(self) -> float:
        """Mean loops per generated token."""
        used = self.depth[self.depth > 0]
        return float(used.float().mean()) if used.numel() else float("nan")


# -- the controller protocol, in one place -----------------------------------------------------
def _begin(controller: LoopController, batch: int, seq_len: int, max_loops: int,
           device: torch.device) -> None:
    """A fresh ``RunState`` per run (the prompt, then each new token: one unit per row)."""
    controller.begin(RunState(batch=batch, seq_len=seq_len, max_loops=max_loops,
                              min_loops=max(1, controller.min_loops()), granularity="token",
                              device=device, training=False))


def _finish(controller: LoopController, logits: Tensor, depth: Tensor, executed: int,
            max_loops: int) -> Tensor:
    """``finish`` with the draft of one run; returns the logits it leaves (ACT: its mixture)."""
    provided = controller.capabilities.sets_logits(False)
    draft = LoopDraft(logits=None if provided else logits, depth=depth, executed=executed,
                      max_loops=max_loops, granularity="token", training=False)
    controller.finish(draft)
    return draft.complete(controller.name).logits


class _DecodeView(StepView):
    """A ``StepView`` of one new token whose readout goes through the decode cache."""

    def __init__(self, model: nn.Module, readout: Any, k: int, z: Tensor, z_prev: Tensor,
                 rows: Tensor, max_loops: int) -> None:
        running = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        super().__init__(model, None, k, z, z_prev, rows, "token", running, max_loops)
        self._readout = readout

    def logits(self) -> Tensor:
        if "logits" not in self._cache:
            self._cache["logits"] = self._readout(self.z, self.rows)
            self.readout_tokens += self.z.shape[0]
        return self._cache["logits"]


def _cache_dtype(model: nn.Module) -> torch.dtype:
    device = model.device.type
    if device == "cuda" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return model.embed.weight.dtype


def _decide(controller: LoopController, view: StepView, last: bool) -> Tensor | None:
    """The controller's stops (n, T) after a loop; none at the cap (it still sees the step)."""
    stop = controller.decide(view)
    if last or stop is None or view.loops < controller.run.min_loops:
        return None
    return stop


def next_token(logits: Tensor, temperature: float, top_k: int | None,
               generator: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) ids: argmax when ``temperature == 0``, else a (top-k) sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_tokens(first: tuple[Tensor, Tensor],
                  advance: Callable[[Tensor, int], tuple[Tensor, Tensor]], *, max_new: int,
                  temperature: float, top_k: int | None, generator: torch.Generator | None,
                  stops: set[int], pad: int, return_logits: bool
                  ) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """The token loop shared by the cached and uncached decoders.

    ``first`` is the (B, V) logits and (B,) depth at each prompt's last position;
    ``advance(token, step)`` feeds the (B,) tokens chosen at ``step`` and returns the next
    position's logits and depth. A row that has produced a stop token emits ``pad`` at depth 0.

    Returns:
        The per-step tokens, depths and (when ``return_logits``) logits, and the stop ids.
    """
    logits, depth = first
    stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    made: list[Tensor] = []
    depths: list[Tensor] = []
    kept: list[Tensor] = []
    for step in range(max_new):
        token = torch.where(done, pad, next_token(logits, temperature, top_k, generator))
        made.append(token)
        depths.append(torch.where(done, 0, depth))
        if return_logits:
            kept.append(logits)
        done = done | torch.isin(token, stop_ids)
        if step == max_new - 1 or (stops and bool(done.all())):
            break
        logits, depth = advance(token, step)
    return made, depths, kept, stop_ids


def assemble_output(model: nn.Module, batch: int, made: list[Tensor], depths: list[Tensor],
                    kept: list[Tensor], prompt_depth: Tensor, prompt_lengths: Tensor,
                    return_logits: bool, stop_ids: Tensor, *, executed: int, mode: str,
                    max_loops: int, cache_bytes: int) -> GenerateOutput:
    """``GenerateOutput`` from the per-step tokens, depths and logits of one decode (any path)."""
    device = prompt_lengths.device
    empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
    tokens = torch.stack(made, dim=1) if made else empty
    depth = torch.stack(depths, dim=1) if depths else empty
    stopped = torch.isin(tokens, stop_ids)
    first_stop = torch.where(stopped.any(dim=1), stopped.float().argmax(dim=1) + 1,
                             tokens.shape[1])
    logits = None
    if return_logits:
        logits = torch.stack(kept, dim=1) if kept else torch.zeros(
            batch, 0, model.vocab_size, device=device)
    return GenerateOutput(
        tokens=tokens, depth=depth, lengths=first_stop.long(), prompt_lengths=prompt_lengths,
        prompt_depth=prompt_depth, logits=logits, executed=int(executed), mode=mode,
        max_loops=max_loops, cache_bytes=cache_bytes)


class Decoder:
    """One ``generate`` call: the cache, the prompt lengths and the counters."""

    def __init__(self, model: nn.Module, controller: LoopController, prompts: list[Tensor],
                 loops: int, max_new: int, parallel: bool,
                 generator: torch.Generator | None) -> None:
        self.model, self.controller, self.loops = model, controller, loops
        self.max_new, self.parallel, self.generator = max_new, parallel, generator
        self.device = model.device
        self.lengths_host = [int(row.numel()) for row in prompts]
        self.lengths = torch.tensor(self.lengths_host, device=self.device)
        self.batch = len(prompts)
        self.prompts = prompts
        capacity = max(self.lengths_host) + max(max_new - 1, 0)
        self.cache = model.new_decode_cache(self.batch, capacity, loops, dtype=_cache_dtype(model))
        self.static = controller.capabilities.static
        self.executed = 0

    # -- the whole run ---------------------------------------------------------------------------
    def generate(self, temperature: float, top_k: int | None, stops: set[int], pad: int,
                 return_logits: bool) -> GenerateOutput:
        tokens = torch.full((self.batch, max(self.lengths_host)), pad, dtype=torch.long,
                            device=self.device)
        for b, row in enumerate(self.prompts):  # right padding (halting.generate docstring)
            tokens[b, : row.numel()] = row.to(self.device)
        logits, depth, prompt_depth = self.prefill(tokens)
        made, depths, kept, stop_ids = sample_tokens(
            (logits, depth), self.decode, max_new=self.max_new, temperature=temperature,
            top_k=top_k, generator=self.generator, stops=stops, pad=pad,
            return_logits=return_logits)
        return self._output(made, depths, kept, prompt_depth, return_logits, pad, stop_ids)

    def _output(self, made: list[Tensor], depths: list[Tensor], kept: list[Tensor],
                prompt_depth: Tensor, return_logits: bool, pad: int,
                stop_ids: Tensor) -> GenerateOutput:
        return assemble_output(self.model, self.batch, made, depths, kept, prompt_depth,
                               self.lengths, return_logits, stop_ids, executed=self.executed,
                               mode="parallel" if self.parallel else "sequential",
                               max_loops=self.loops, cache_bytes=self.cache.nbytes())

    # -- prefill ---------------------------------------------------------------------------------
    def prefill(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Full-sequence loop over the prompts; fills the cache. Returns the last positions'
        logits (B, V) and depth (B,), and every position's depth (B, L), 0 at padding."""
        model, batch, seq = self.model, *tokens.shape
        ctx = model.prepare(tokens, keep_kv=True)
        z = model.init_state(ctx, generator=self.generator)
        valid = torch.arange(seq, device=self.device) < self.lengths.unsqueeze(1)  # (B, L)
        active = torch.ones_like(valid)
        depth = torch.full((batch, seq), self.loops, dtype=torch.long, device=self.device)
        rows = torch.arange(batch, device=self.device)
        last = self.lengths - 1
        _begin(self.controller, batch, seq, self.loops, self.device)
        states = []
        for k in range(self.loops):
            z, active, depth = self._prefill_step(z, ctx, k, active, valid, depth, rows)
            model.fill_decode_cache(self.cache, ctx, k, self.lengths)
            states.append(z[rows, last])  # (B, D) after k+1 loops, frozen past an exit
        logits = model.readout(z, ctx)  # z holds every position's exit state (frozen policy)
        logits = _finish(self.controller, logits, depth, self.executed, self.loops)
        model.fill_decode_plain(self.cache, ctx, self.lengths)
        model.decode_remember(self.cache, torch.stack(states).unsqueeze(2))  # (R, B, 1, D)
        return logits[rows, last], depth[rows, last], torch.where(valid, depth, 0)

    def _prefill_step(self, z: Tensor, ctx: LoopContext, k: int, active: Tensor, valid: Tensor,
                      depth: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Loop k on the running positions; the controller's exits (padding leaves after 0)."""
        running = int(active.sum())
        if running == 0:  # every position exited: the cache keeps their frozen entries
            return z, active, depth
        every = running == active.numel()
        z_new = self.model.step(z, ctx, k) if every else self.model.step(z, ctx, k, active=active)
        self.executed += running
        if self.static:
            return z_new, active, depth
        view = StepView(self.model, ctx, k, z_new, z, rows, "token", active, self.loops)
        stop = _decide(self.controller, view, k == self.loops - 1)
        leaving = active & ~valid  # padding is never read: stop computing it
        if stop is not None:
            leaving = leaving | (active & stop)
        depth = torch.where(leaving, k + 1, depth)
        return z_new, active & ~leaving, depth

    # -- one new token ---------------------------------------------------------------------------
    def decode(self, token: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Feed ``token`` (B,) at each row's next position; its logits (B, V) and depth (B,)."""
        model = self.model
        at = DecodePositions(self.lengths + step, min(self.lengths_host) + step,
                             max(self.lengths_host) + step)
        ids = token.view(-1, 1)
        inject = model.decode_inject(ids, self.cache, at)
        z0 = model.init_state(LoopContext(tokens=ids, inject=inject), generator=self.generator)
        _begin(self.controller, self.batch, 1, self.loops, self.device)
        run = self._parallel_token if self.parallel else self._sequential_token
        states, depth, early, same = run(z0, inject, at)
        if early:  # frozen policy: loops past an exit show the exit loop's state and keys
            if same is not None:  # every row exited after `same` loops: one slice copy
                states[same:] = states[same - 1]
            else:
                loops = torch.arange(self.loops, device=self.device).unsqueeze(1)
                index = torch.minimum(loops, depth.unsqueeze(0) - 1)  # (R, B)
                states = states.gather(0, index[..., None, None].expand_as(states))
            model.decode_freeze(self.cache, at, depth, self.loops, same)
        model.decode_remember(self.cache, states)
        logits = model.decode_readout(states[-1], self.cache, at)  # (B, 1, V)
        logits = _finish(self.controller, logits, depth.unsqueeze(1), self.executed, self.loops)
        return logits[:, 0], depth

    def _readout(self, at: DecodePositions) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda z, rows: self.model.decode_readout(z, self.cache, at.select(rows), rows)

    def _sequential_token(self, z0: Tensor, inject: Tensor, at: DecodePositions
                          ) -> tuple[Tensor, Tensor, bool, int | None]:
        """Loop after loop; a row whose token exits leaves the batch (its compute stops)."""
        states = z0.new_zeros((self.loops, *z0.shape))  # (R, B, 1, D)
        depth = torch.full((self.batch,), self.loops, dtype=torch.long, device=self.device)
        running, rows, z, sub_at, sub_inject = torch.arange(self.batch, device=self.device), \
            None, z0, at, inject
        early = False
        for k in range(self.loops):
            z_new = self.model.decode_step(z, sub_inject, self.cache, k, sub_at, rows)
            self.executed += z_new.shape[0]
            states[k] = z_new if rows is None else states[k].index_put((running,), z_new)
            if self.static:
                z = z_new
                continue
            view = _DecodeView(self.model, self._readout(at), k, z_new, z, running, self.loops)
            stop = _decide(self.controller, view, k == self.loops - 1)
            z = z_new
            if stop is None or not bool(stop.any()):
                continue
            stop = stop.view(-1)
            depth[running[stop]] = k + 1
            keep = (~stop).nonzero().squeeze(1)
            if keep.numel() == 0:
                same = None if early else k + 1  # every row leaves after the same loop
                return states, depth, True, same
            early = True
            running, z = running[keep], z[keep]
            rows, sub_at, sub_inject = running, at.select(running), inject[running]
        return states, depth, early, None

    def _parallel_token(self, z0: Tensor, inject: Tensor, at: DecodePositions
                        ) -> tuple[Tensor, Tensor, bool, int | None]:
        """All loops in one forward (PLT); the controller then picks each row's exit."""
        states = self.model.decode_parallel(inject, self.cache, at, self.loops)  # (R, B, 1, D)
        self.executed += self.batch * self.loops
        depth = torch.full((self.batch,), self.loops, dtype=torch.long, device=self.device)
        if self.static:
            return states, depth, False, None
        running, early = torch.arange(self.batch, device=self.device), False
        for k in range(self.loops):
            before = z0 if k == 0 else states[k - 1]
            view = _DecodeView(self.model, self._readout(at), k, states[k][running],
                               before[running], running, self.loops)
            stop = _decide(self.controller, view, k == self.loops - 1)
            if stop is None or not bool(stop.any()):
                continue
            stop = stop.view(-1)
            depth[running[stop]] = k + 1
            running = running[~stop]
            if running.numel() == 0:
                return states, depth, True, None if early else k + 1
            early = True
        return states, depth, early, None
