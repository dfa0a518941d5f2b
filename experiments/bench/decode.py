"""Benchmarks of cached decoding (``halting.generate``): ``decode``.

Every figure is a ratio of two ``generate`` calls timed side by side (A B A B ...) on the same
model, prompt and device, greedy, batch 1, a short prompt so that decode steps dominate (the
prefill of a 4-token prompt is included in both sides):

* PLT (``parallel_loop``) parallel decode at R = 2 over R = 1: what a second loop costs per token
  when its rows run in the same forward (target <= 1.3: "close to one loop").
* The same R = 2 / R = 1 ratio at twice the width (information: how it moves with size).
* PLT parallel over sequential decode at R = 2 and R = 4 (same tokens, same logits; the test
  suite checks that): the one-forward path against loop after loop.
* An adaptive exit (``serial_loop``, cap R = 8; a scripted controller exits alternate tokens
  after 1 and 7 loops, mean depth 4) over ``fixed`` at the same mean depth (4 loops; target
  <= 1.2: time proportional to the depth used) and over ``fixed`` at the cap (8; ideal 0.5).
"""

from __future__ import annotations

from typing import Any

import torch

from experiments.bench.core import BENCHMARKS, BenchConfig, Row, alternate, make_row, ratios
from experiments.bench.loop import tiny_model
from halting import generate
from halting.base import Capabilities, LoopController, RunState, StepView


class AlternatingExit(LoopController):
    """Bench-only: the i-th run (the prompt, then each new token) exits after ``plan[i % n]``
    loops, so the mean depth of a long decode is known in advance."""

    name = "alternating_exit"
    capabilities = Capabilities(granularities=("token",))

    def __init__(self, plan: tuple[int, ...]) -> None:
        super().__init__()
        self.plan, self.runs, self.target = plan, 0, plan[0]

    def begin(self, state: RunState) -> None:
        super().begin(state)
        self.target = self.plan[self.runs % len(self.plan)]
        self.runs += 1

    def decide(self, view: StepView) -> torch.Tensor | None:
        if view.loops < self.target:
            return None  # the cheap answer: nothing stops, no host synchronisation
        return torch.ones(view.z.shape[:2], dtype=torch.bool, device=view.z.device)


def _sizes(cfg: BenchConfig) -> dict[str, int]:
    if cfg.quick:
        return dict(d_model=64, n_layers=2, n_heads=4, vocab_size=64, new=32, prompt=4)
    return dict(d_model=256, n_layers=4, n_heads=8, vocab_size=256, new=64, prompt=4)


def _decoder(cfg: BenchConfig, model: Any, prompt: torch.Tensor, new: int, controller: Any,
             loops: int, mode: str = "auto") -> Any:
    def run() -> Any:
        with cfg.autocast():
            return generate(model, prompt, controller, max_new_tokens=new, max_loops=loops,
                            mode=mode)

    return run


def _model(arch: str, cfg: BenchConfig, size: dict[str, int]) -> Any:
    return tiny_model(arch, cfg, d_model=size["d_model"], n_layers=size["n_layers"],
                      n_heads=size["n_heads"], vocab_size=size["vocab_size"],
                      max_seq_len=size["prompt"] + size["new"])


@BENCHMARKS.register("decode")
def bench_decode(cfg: BenchConfig) -> list[Row]:
    """PLT parallel decode vs loops and vs sequential; adaptive exits vs fixed depth."""
    size = _sizes(cfg)
    new = size["new"]
    prompt = torch.randint(0, size["vocab_size"], (1, size["prompt"]),
                           generator=torch.Generator().manual_seed(cfg.seed)).to(cfg.device)
    plt = _model("parallel_loop", cfg, size)
    times = alternate({
        "r1": _decoder(cfg, plt, prompt, new, "fixed", 1, "parallel"),
        "r2_parallel": _decoder(cfg, plt, prompt, new, "fixed", 2, "parallel"),
        "r2_sequential": _decoder(cfg, plt, prompt, new, "fixed", 2, "sequential"),
        "r4_parallel": _decoder(cfg, plt, prompt, new, "fixed", 4, "parallel"),
        "r4_sequential": _decoder(cfg, plt, prompt, new, "fixed", 4, "sequential"),
    }, cfg)
    config = {"arch": "parallel_loop", "batch": 1, **size}
    rows = [
        make_row("decode", "PLT parallel decode time/token: R=2 / R=1",
                 ratios(times, "r2_parallel", "r1"), "<= 1.3", raw={"seconds": times},
                 config=config),
        make_row("decode", "PLT decode R=2: parallel / sequential",
                 ratios(times, "r2_parallel", "r2_sequential"), "< 1", raw={"seconds": times},
                 config=config),
        make_row("decode", "PLT decode R=4: parallel / sequential",
                 ratios(times, "r4_parallel", "r4_sequential"), "< 1", raw={"seconds": times},
                 config=config),
        make_row("decode", "PLT parallel decode time/token: R=4 / R=1",
                 ratios(times, "r4_parallel", "r1"), None, raw={"seconds": times},
                 config=config),
    ]
    return rows + [_wide_row(cfg, size, prompt)] + _adaptive_rows(cfg, size, prompt)


def _wide_row(cfg: BenchConfig, size: dict[str, int], prompt: torch.Tensor) -> Row:
    """R=2 / R=1 again at twice the width (d_model 512 in the full run): how the ratio moves with
    size — the larger the matrices, the larger the share of time in the matrix products, whose
    second row is not free on a CPU."""
    wide = {**size, "d_model": 2 * size["d_model"]}
    plt = _model("parallel_loop", cfg, wide)
    times = alternate({
        "r1": _decoder(cfg, plt, prompt, wide["new"], "fixed", 1, "parallel"),
        "r2_parallel": _decoder(cfg, plt, prompt, wide["new"], "fixed", 2, "parallel"),
    }, cfg)
    return make_row("decode", f"PLT parallel decode time/token: R=2 / R=1 at d_model "
                    f"{wide['d_model']}", ratios(times, "r2_parallel", "r1"), None,
                    raw={"seconds": times}, config={"arch": "parallel_loop", "batch": 1, **wide})


def _adaptive_rows(cfg: BenchConfig, size: dict[str, int], prompt: torch.Tensor) -> list[Row]:
    """Exits after 1 and 7 loops on alternate tokens (mean 4, cap 8) vs fixed(4) and fixed(8)."""
    serial = _model("serial_loop", cfg, size)
    new, cap, plan = size["new"], 8, (1, 7)
    times = alternate({
        "adaptive": _decoder(cfg, serial, prompt, new, AlternatingExit(plan), cap),
        "fixed_mean": _decoder(cfg, serial, prompt, new, "fixed", sum(plan) // len(plan)),
        "fixed_cap": _decoder(cfg, serial, prompt, new, "fixed", cap),
    }, cfg)
    out = generate(serial, prompt, AlternatingExit(plan), max_new_tokens=new, max_loops=cap)
    config = {"arch": "serial_loop", "batch": 1, "cap": cap, "plan": list(plan),
              "mean_depth": out.mean_depth, **size}
    ideal = out.mean_depth / cap
    return [
        make_row("decode", f"adaptive exit (mean depth {out.mean_depth:.2f}) / fixed(4), "
                 "serial_loop", ratios(times, "adaptive", "fixed_mean"), "<= 1.2",
                 raw={"seconds": times}, config=config),
        make_row("decode", f"adaptive exit (mean depth {out.mean_depth:.2f}) / fixed(cap=8), "
                 f"ideal {ideal:.2f}", ratios(times, "adaptive", "fixed_cap"),
                 f"<= {1.2 * ideal:.2f}", raw={"seconds": times}, config=config),
    ]
