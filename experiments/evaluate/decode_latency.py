"""Decode latency of a trained model at a loop count, for the study's loops-vs-cost table.

``decode_ms_per_token(model, tokens, loops)``: wall-clock milliseconds per generated token of
``halting.generate`` (greedy, ``fixed(loops)``, batch 1, a 4-token prompt from the evaluation
batch, up to 16 new tokens), the median of 3 runs after one warm-up. It is one machine's latency,
printed next to the FLOPs per token; ratios worth claiming live in ``loopscope-bench`` (``decode``).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

PROMPT, NEW, RUNS = 4, 16, 3


def decode_ms_per_token(model: Any, tokens: torch.Tensor, loops: int) -> float:
    """Milliseconds per generated token, or NaN when the model has no cached decoding."""
    from halting import generate

    if not callable(getattr(model, "new_decode_cache", None)):
        return math.nan
    prompt = tokens[:1, : min(PROMPT, tokens.shape[1])]
    new = min(NEW, model.config.max_seq_len + 1 - prompt.shape[1])
    if new < 1:
        return math.nan
    seconds = []
    for _ in range(RUNS + 1):
        start = time.perf_counter()
        generate(model, prompt, "fixed", max_new_tokens=new, max_loops=loops)
        if prompt.device.type == "cuda":
            torch.cuda.synchronize(prompt.device)
        seconds.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(seconds[1:]) / new
