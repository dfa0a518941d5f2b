"""``generate``: KV-cached decoding for every looped architecture, with per-token adaptive exits.

The prompt is prefilled with full-sequence loop steps (``model.step``, as ``run_loop`` runs them),
then each new token is decoded alone: loop k of the token reads the per-(loop, layer) key/value
cache of the earlier positions (``models.decoding``) and writes its own entry.

**Padding: right.** Prompts of different lengths are right-padded; row b's next token sits at
position ``len_b`` and writes slot ``len_b`` of each cache, so every row keeps its own positions:
rotary angles, PLT's one-position CLP shift and its sliding window need no per-row offsets, and the
prefill is the ordinary causal forward — a real position never attends to the padding after it,
so prefill logits equal the unpadded forward's. Decode steps mask each row's cache at its own
length (slots past it hold padding keys until the row overwrites them). Left padding would instead
need every position, shift and window shifted per row.

**Adaptive exits (token granularity).** The controller decides each new token's depth after every
loop, exactly as ``run_loop(granularity="token")`` decides a position's: it gets ``begin`` once per
token (one unit per row), a ``StepView`` of the rows still running after each loop, and ``finish``
with the token's output (ACT's mixture). A row whose token exits leaves the batch for the remaining
loops of that token (sequential path), so an early exit costs nothing further.

**What later tokens read at loops a token never ran: frozen** — its last computed keys/values (and,
for PLT's CLP, its exit state), the policy of ``run_loop(token_policy="frozen")``. Decode and
full-sequence evaluation therefore agree: position t's logits and depth are the same whether it is
decoded or run in ``run_loop`` on the whole sequence (``tests/halting/test_generate.py``). One
exception: Huginn's coda (``recurrent_depth``) mixes positions, so a controller that reads the
*readout* at an intermediate loop sees earlier tokens' coda keys at their exits when decoding but at
the current loop in ``run_loop``; criteria on the state (``residual``, ``cosine``,
``acceleration``) or the halt head agree exactly.

**PLT parallel decode** (``mode="parallel"``, the default for ``parallel_loop`` with CLP and shared
KV): all R loops of a new token run as R query rows of one forward (``decode_parallel``). A
controller then picks the exit among the R computed states — same depths and logits as the
sequential path — but nothing is saved by exiting: the loops already ran together.
``mode="sequential"`` runs loop after loop (the reference, and the path where exits save compute).

Huginn's random initial state (``recurrent_depth`` with ``init_scale > 0``) is drawn per new token
from ``generator``; decoding then equals a full forward given the same draws, not torch's
sequence-wide draw (with ``init_scale = 0`` the two are identical). A row that produced a stop
token is fed ``pad_token_id`` until every row has stopped (its compute is not saved).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from halting.base import LoopController, build_controller
from halting.decoder import Decoder, GenerateOutput
from halting.loop import set_run_mode
from halting.uncached import UncachedDecoder

DECODE_MODES = ("auto", "parallel", "sequential")



def token_refusal(controller: LoopController) -> str:
    """Why ``controller`` cannot decide each new token's depth in ``generate`` ('' if it can)."""
    if "token" not in controller.granularities:
        return (f"controller {controller.name!r} decides per {'/'.join(controller.granularities)}"
                ", not per token")
    if controller.capabilities.drives_loop:
        return f"controller {controller.name!r} drives the loop itself (no per-token exits)"
    return ""

def generate(model: nn.Module, prompt_tokens: Tensor | Sequence[Sequence[int] | Tensor],
             controller: LoopController | str | dict = "fixed", *, max_new_tokens: int,
             max_loops: int, temperature: float = 0.0, top_k: int | None = None,
             generator: torch.Generator | None = None, stop_tokens: Sequence[int] = (),
             pad_token_id: int = 0, return_logits: bool = False,
             mode: str = "auto") -> GenerateOutput:
    """Decode ``max_new_tokens`` tokens after each prompt with a per-(loop, layer) KV cache.

    Args:
        model: a ``models`` looped model. One with the ``models.decoding`` cache (the built-in
            architectures) decodes cached; any other ``LoopedModel`` (the ``models.hf``
            adapters) decodes uncached (``halting.uncached``: exact, but each token re-runs
            the whole sequence).
        prompt_tokens: a (T,) or (B, T) int tensor, or a list of 1-D id sequences (any lengths;
            right-padded internally, see the module docstring).
        controller: any controller with token granularity (``fixed``, ``convergence``, ``act``,
            ``pondernet``, ``ouro_gate``, ``halt_token``); run in evaluation mode.
        max_new_tokens: tokens to generate per row (>= 0).
        max_loops: loop cap (``fixed`` without ``loops`` runs exactly this many).
        temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
        top_k: sample among the ``top_k`` most likely tokens only.
        generator: ``torch.Generator`` on the model's device for sampling (and Huginn's random
            initial state); seed it for reproducible samples.
        stop_tokens: ids that end a row (the stop token is kept in ``tokens``).
        pad_token_id: id written after a row stopped (and fed to it while others finish).
        return_logits: keep the (B, N, V) logits of every step.
        mode: ``auto`` (parallel where the model supports it), ``parallel`` or ``sequential``
            (cached models only; ``GenerateOutput.mode`` is ``uncached`` for the others).

    Returns:
        GenerateOutput.

    Example:
        >>> out = generate(model, [[1, 2, 3], [4, 5]], "fixed", max_new_tokens=8, max_loops=2)
        >>> out.tokens.shape, out.depth  # (2, 8), per-token loops
    """
    controller = build_controller(controller)
    prompts = _as_prompts(prompt_tokens)
    settings = _validate(model, prompts, controller, max_new_tokens, max_loops, temperature,
                         top_k, generator, stop_tokens, pad_token_id, mode)
    with torch.no_grad(), _eval_mode(model, controller):
        controller.bind(model)
        planned = controller.planned_loops(max_loops)
        if not settings["cached"]:
            run = UncachedDecoder(model, controller, prompts, planned, max_new_tokens, generator)
            return run.generate(temperature, top_k, set(stop_tokens), pad_token_id,
                                return_logits)
        parallel = settings["parallel"] and planned > 1
        run = Decoder(model, controller, prompts, planned, max_new_tokens, parallel, generator)
        return run.generate(temperature, top_k, set(stop_tokens), pad_token_id, return_logits)


# -- input checks ------------------------------------------------------------------------------
def _as_prompts(prompt_tokens: Any) -> list[Tensor]:
    if isinstance(prompt_tokens, Tensor):
        if prompt_tokens.dim() not in (1, 2):
            raise ValueError("prompt_tokens must be a (T,) or (B, T) tensor or a list of id "
                             f"sequences, got a tensor of shape {tuple(prompt_tokens.shape)}")
        rows = [prompt_tokens] if prompt_tokens.dim() == 1 else list(prompt_tokens)
    elif isinstance(prompt_tokens, Sequence) and not isinstance(prompt_tokens, str):
        rows = [torch.as_tensor(row) if not isinstance(row, Tensor) else row
                for row in prompt_tokens]
    else:
        raise TypeError("prompt_tokens must be a tensor or a list of id sequences, got "
                        f"{type(prompt_tokens).__name__}")
    if not rows:
        raise ValueError("prompt_tokens is empty: give at least one prompt of at least one token")
    for b, row in enumerate(rows):
        if row.dim() != 1 or row.numel() == 0:
            raise ValueError(f"prompt {b} is empty (shape {tuple(row.shape)}); every prompt needs "
                             "at least one token")
        if row.dtype.is_floating_point or row.dtype == torch.bool:
            raise ValueError(f"prompt {b} must hold integer token ids, got dtype {row.dtype}")
    return [row.long() for row in rows]


def _validate(model: Any, prompts: list[Tensor], controller: LoopController, max_new: Any,
              max_loops: Any, temperature: Any, top_k: Any, generator: Any,
              stop_tokens: Any, pad_token_id: Any, mode: Any) -> dict[str, Any]:
    cached = callable(getattr(model, "new_decode_cache", None))
    if not cached and not all(callable(getattr(model, name, None))
                              for name in ("prepare", "init_state", "step", "readout")):
        raise TypeError(f"model {type(model).__name__} is not a LoopedModel (needs prepare / "
                        "init_state / step / readout)")
    for name, value, low in (("max_new_tokens", max_new, 0), ("max_loops", max_loops, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    limit, vocab = int(getattr(model, "max_seq_len", None) or model.config.max_seq_len), \
        model.vocab_size
    for b, row in enumerate(prompts):
        if row.numel() > limit:
            raise ValueError(f"prompt {b} has {row.numel()} tokens, more than max_seq_len={limit}")
        if row.numel() + max_new - 1 > limit:
            raise ValueError(f"prompt {b} ({row.numel()} tokens) + max_new_tokens={max_new} "
                             f"needs {row.numel() + max_new - 1} positions (the last new token is "
                             f"never fed back); max_seq_len={limit}")
    for token in (*stop_tokens, pad_token_id):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ValueError(f"stop/pad token {token!r} is outside the vocabulary [0, {vocab})")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or an integer in [1, {vocab}], got {top_k!r}")
    if generator is not None and torch.device(generator.device).type != model.device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on "
                         f"{model.device}; make it with torch.Generator(device=...)")
    if token_refusal(controller):
        raise ValueError(f"controller {controller.name!r} cannot decide per token (supports "
                         f"{controller.granularities}); use fixed, convergence, act, pondernet, "
                         "ouro_gate or halt_token")
    if mode not in DECODE_MODES:
        raise ValueError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
    if not cached:
        if mode != "auto":
            raise ValueError(f"mode={mode!r} needs cached decoding (models.decoding); "
                             f"{type(model).__name__} decodes uncached: use mode='auto'")
        return {"parallel": False, "cached": False}
    can_parallel = bool(getattr(model, "parallel_decode", False))
    if mode == "parallel" and not can_parallel:
        raise ValueError(f"mode='parallel' needs a parallel_loop model with clp=True and "
                         f"shared_kv=True; {type(model).__name__} decodes sequentially")
    return {"parallel": can_parallel and mode != "sequential", "cached": True}


@contextlib.contextmanager
def _eval_mode(model: nn.Module, controller: LoopController) -> Iterator[None]:
    """Decode in evaluation mode (model and controller); restore the callers' modes after."""
    modes = (model.training, controller.training)
    model.eval()
    set_run_mode(controller, model, "eval")
    try:
        yield
    finally:
        model.train(modes[0])
        nn.Module.train(controller, modes[1])  # not a hand-set mode (halting.loop, "Modes")
