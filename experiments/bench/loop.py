"""Benchmarks of the loop itself: ``overhead``, ``compaction``, ``throughput``, ``scaling``.

* ``overhead``: ``halting.run_loop`` with ``fixed(k)`` against the loop a user would write by hand
  (``prepare``, ``init_state``, ``k`` x ``step``, ``readout``) on the same model and batch.
* ``compaction``: a scripted controller (``ScriptedExit``, below; built on
  ``halting.base.LoopController``, not registered) makes half the rows (tokens) halt after loop 2
  and half after loop 16; compared with every row running 16 loops. Compaction is what makes
  adaptive halting save wall time rather than just masking (REFERENCE.md §2, "a mask does not save
  compute"); ideal ratio (2 + 16) / 32 = 0.5625.
* ``throughput``: training tokens/s of a looped model (``serial_loop``: R loops of one L-layer
  block) against an unlooped stack of R*L layers built from the same ``models/layers.py`` blocks
  — ``serial_loop`` with ``n_layers = R*L`` run for one loop — at the same width (same FLOPs).
* ``scaling``: forward cost of ``parallel_loop`` vs loops, sequence length and batch, as ratios to
  the smallest case, with the log-log exponent fitted to the median ratios.

Sizes are tiny in ``--quick`` mode and modest otherwise; every row's ``config`` records them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from experiments.bench.core import (
    BENCHMARKS,
    BenchConfig,
    Row,
    alternate,
    loglog_slope,
    make_row,
    ratios,
)
from halting import build_controller, run_loop
from halting.base import Capabilities, LoopController, StepView
from models import build_model


def tiny_model(arch: str, cfg: BenchConfig, *, train: bool = False, **overrides: Any) -> Any:
    """A seeded model of ``arch`` on the run's device, in eval (or train) mode.

    ``parallel_loop``'s sliding window defaults to min(64, max_seq_len) (64 is upstream's).
    """
    if arch == "parallel_loop" and "max_seq_len" in overrides:
        overrides.setdefault("window", min(64, overrides["max_seq_len"]))
    torch.manual_seed(cfg.seed)
    model = build_model(arch, **overrides).to(cfg.device)
    return model.train(train)


def random_tokens(vocab: int, batch: int, seq_len: int, cfg: BenchConfig) -> Tensor:
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randint(0, vocab, (batch, seq_len), generator=generator).to(cfg.device)


def bare_loop(model: Any, tokens: Tensor, loops: int) -> Tensor:
    """The loop a user writes by hand: the baseline ``run_loop`` is compared with."""
    ctx = model.prepare(tokens)
    z = model.init_state(ctx)
    for k in range(loops):
        z = model.step(z, ctx, k)
    return model.readout(z, ctx)


def inference(cfg: BenchConfig, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` wrapped in ``torch.no_grad`` and the run's autocast."""

    def run() -> Any:
        with torch.no_grad(), cfg.autocast():
            return fn()

    return run


# -- overhead ------------------------------------------------------------------------------------
@BENCHMARKS.register("overhead")
def bench_overhead(cfg: BenchConfig) -> list[Row]:
    """run_loop(fixed(k)) with and without the recorded trace / a bare loop of ``model.step``."""
    size = dict(batch=8, seq_len=32, d_model=64, loops=8) if cfg.quick else \
        dict(batch=16, seq_len=64, d_model=128, loops=16)
    arch = "parallel_loop"
    model = tiny_model(arch, cfg, d_model=size["d_model"], n_layers=2, vocab_size=64,
                       max_seq_len=size["seq_len"])
    tokens = random_tokens(64, size["batch"], size["seq_len"], cfg)
    loops = size["loops"]
    fixed = build_controller("fixed", loops=loops).eval()
    # A 5% target needs more repetitions than the default; "bare_again" (the same bare loop
    # timed as a separate case) shows the noise floor of this run.
    times = alternate({
        "bare": inference(cfg, lambda: bare_loop(model, tokens, loops)),
        "run_loop": inference(cfg, lambda: run_loop(model, tokens, fixed, max_loops=loops)),
        "run_loop_record": inference(
            cfg, lambda: run_loop(model, tokens, fixed, max_loops=loops, record=True)),
        "bare_again": inference(cfg, lambda: bare_loop(model, tokens, loops)),
    }, cfg, reps=3 * cfg.repetitions)
    config = {"arch": arch, "n_layers": 2, **size}
    return [
        make_row("overhead", "bare step loop / the same bare loop (noise floor of this run)",
                 ratios(times, "bare_again", "bare"), None, raw={"seconds": times},
                 config=config),
        make_row("overhead", f"run_loop(fixed({loops})) / bare step loop, no record",
                 ratios(times, "run_loop", "bare"), "<= 1.05", raw={"seconds": times},
                 config=config),
        make_row("overhead", f"run_loop(fixed({loops}), record=True) / bare step loop",
                 ratios(times, "run_loop_record", "bare"), "<= 1.3", raw={"seconds": times},
                 config=config),
    ]


# -- compaction ----------------------------------------------------------------------------------
class ScriptedExit(LoopController):
    """A deterministic controller for benchmarks: row (token) ``i`` stops after ``plan[i]`` loops.

    Args:
        plan: (B,) exit loop per row (sample granularity) or (B, T) per token (token granularity).
    """

    name = "scripted_exit"

    def __init__(self, plan: Tensor) -> None:
        super().__init__()
        if plan.dtype != torch.long or plan.dim() not in (1, 2):
            raise ValueError(f"plan must be a (B,) or (B, T) int64 tensor, got {plan.dtype} "
                             f"{tuple(plan.shape)}")
        self.plan = plan
        self.capabilities = Capabilities(granularities=("sample",) if plan.dim() == 1
                                         else ("token",))

    def decide(self, view: StepView) -> Tensor | None:
        return self.plan[view.rows] == view.loops  # (n,) or (n, T)


def exit_plan(batch: int, seq_len: int | None, early: int, late: int, seed: int) -> Tensor:
    """Half the rows (or, per row, a random half of the tokens) exit at ``early``, half at ``late``.

    Rows alternate (even rows early) so compaction must gather non-contiguous rows.
    """
    if seq_len is None:
        plan = torch.full((batch,), late, dtype=torch.long)
        plan[0::2] = early
        return plan
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(batch, seq_len, generator=generator).argsort(dim=1)  # (B, T)
    plan = torch.full((batch, seq_len), late, dtype=torch.long)
    plan.scatter_(1, order[:, : seq_len // 2], early)
    return plan


@BENCHMARKS.register("compaction")
def bench_compaction(cfg: BenchConfig) -> list[Row]:
    """Half the rows (tokens) halting at loop 2, half at 16 / every row running 16 loops."""
    size = dict(batch=16, seq_len=32, d_model=64) if cfg.quick else \
        dict(batch=32, seq_len=64, d_model=128)
    early, late, arch = 2, 16, "parallel_loop"
    model = tiny_model(arch, cfg, d_model=size["d_model"], n_layers=2, vocab_size=64,
                       max_seq_len=size["seq_len"])
    tokens = random_tokens(64, size["batch"], size["seq_len"], cfg)
    batch, seq_len = size["batch"], size["seq_len"]
    fixed = build_controller("fixed", loops=late).eval()
    by_row = ScriptedExit(exit_plan(batch, None, early, late, cfg.seed).to(cfg.device)).eval()
    by_token = ScriptedExit(exit_plan(batch, seq_len, early, late, cfg.seed).to(cfg.device)).eval()
    cases = {
        "all_16": lambda: run_loop(model, tokens, fixed, max_loops=late),
        "sample_2_16": lambda: run_loop(model, tokens, by_row, max_loops=late),
        "token_2_16": lambda: run_loop(model, tokens, by_token, max_loops=late,
                                       granularity="token", token_policy="frozen"),
    }
    executed = {name: inference(cfg, fn)().executed for name, fn in cases.items()}
    times = alternate({name: inference(cfg, fn) for name, fn in cases.items()}, cfg)
    ideal = (early + late) / (2 * late)
    config = {"arch": arch, "n_layers": 2, "early": early, "late": late, **size}
    raw = {"seconds": times, "executed": executed, "ideal": ideal}
    return [
        make_row("compaction", f"half rows halt at {early}, half at {late} / all rows {late} "
                 "loops (sample)", ratios(times, "sample_2_16", "all_16"), "<= 0.65", raw=raw,
                 config=config, note=f"ideal {ideal:.4f}; executed row-steps "
                 f"{executed['sample_2_16']} vs {executed['all_16']}"),
        make_row("compaction", f"half tokens halt at {early}, half at {late} / all {late} loops "
                 "(token, frozen)", ratios(times, "token_2_16", "all_16"), "<= 0.65", raw=raw,
                 config=config, note=f"ideal {ideal:.4f}; executed token-steps "
                 f"{executed['token_2_16']} vs {executed['all_16'] * seq_len}"),
    ]


# -- throughput ----------------------------------------------------------------------------------
def train_step(model: Any, optimizer: torch.optim.Optimizer, tokens: Tensor, loops: int,
               cfg: BenchConfig) -> None:
    """One language-model training step (next-token CE, backward, AdamW step)."""
    with cfg.autocast():
        logits = model(tokens[:, :-1], loops=loops)  # (B, T-1, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@BENCHMARKS.register("throughput")
def bench_throughput(cfg: BenchConfig) -> list[Row]:
    """Training tokens/s: R loops of an L-layer block / an unlooped stack of R*L layers."""
    size = dict(batch=8, seq_len=33, d_model=64, layers=1) if cfg.quick else \
        dict(batch=16, seq_len=65, d_model=128, layers=2)
    tokens = random_tokens(64, size["batch"], size["seq_len"], cfg)
    common = dict(d_model=size["d_model"], vocab_size=64, max_seq_len=size["seq_len"])
    rows = []
    for loops in (2, 4):
        looped = tiny_model("serial_loop", cfg, train=True, n_layers=size["layers"], **common)
        stack = tiny_model("serial_loop", cfg, train=True, n_layers=size["layers"] * loops,
                           **common)
        opt_looped = torch.optim.AdamW(looped.parameters(), lr=1e-4)
        opt_stack = torch.optim.AdamW(stack.parameters(), lr=1e-4)
        times = alternate({
            "looped": lambda m=looped, o=opt_looped, r=loops: train_step(m, o, tokens, r, cfg),
            "stack": lambda m=stack, o=opt_stack: train_step(m, o, tokens, 1, cfg),
        }, cfg)
        # tokens/s ratio = (tokens / t_looped) / (tokens / t_stack) = t_stack / t_looped
        rows.append(make_row(
            "throughput", f"train tokens/s: serial_loop {loops} loops x {size['layers']} layers / "
            f"unlooped {loops * size['layers']} layers", ratios(times, "stack", "looped"),
            ">= 0.95", raw={"seconds": times},
            config={"loops": loops, "looped_arch": "serial_loop", **size},
            note="unlooped stack = serial_loop with n_layers=R*L run for 1 loop (same blocks)"))
    return rows


# -- scaling -------------------------------------------------------------------------------------
def _scaling_axes(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {"loops": {"values": [1, 2, 4, 8], "batch": 4, "seq_len": 64, "loops": None},
                "seq_len": {"values": [64, 128, 256], "batch": 2, "seq_len": None, "loops": 4},
                "batch": {"values": [1, 4, 16], "batch": None, "seq_len": 64, "loops": 4}}
    return {"loops": {"values": [1, 2, 4, 8, 16, 32], "batch": 8, "seq_len": 64, "loops": None},
            "seq_len": {"values": [64, 128, 256, 512, 1024], "batch": 4, "seq_len": None,
                        "loops": 4},
            "batch": {"values": [1, 2, 4, 8, 16, 32], "batch": None, "seq_len": 64, "loops": 4}}


def _scaling_row(axis: str, values: list[int], times: dict[str, list[float]],
                 config: dict[str, Any]) -> Row:
    names = [str(v) for v in values]
    per_size = {name: ratios(times, name, names[0]) for name in names}
    medians = [sorted(r)[len(r) // 2] for r in per_size.values()]
    per_rep = [loglog_slope(values, [per_size[n][i] for n in names])
               for i in range(len(times[names[0]]))]
    exponent = loglog_slope(values, medians)
    table = [{axis: v, "median ratio": m, "min": min(per_size[n]), "max": max(per_size[n]),
              "linear would be": v / values[0]} for v, n, m in zip(values, names, medians)]
    row = make_row("scaling", f"forward cost ∝ {axis}^α ({values[0]}..{values[-1]}): fitted α",
                   per_rep, None, raw={"seconds": times, "table": table}, config=config,
                   note=f"ratio at {values[-1]} vs {values[0]}: {medians[-1]:.3g}")
    row.median = exponent  # the fit to the median ratios; low/high: fits to single repetitions
    return row


@BENCHMARKS.register("scaling")
def bench_scaling(cfg: BenchConfig) -> list[Row]:
    """Forward cost vs loops, sequence length and batch: ratios to the smallest and the exponent."""
    d_model, arch = 64, "parallel_loop"
    axes = _scaling_axes(cfg.quick)
    model = tiny_model(arch, cfg, d_model=d_model, n_layers=2, vocab_size=64,
                       max_seq_len=max(axes["seq_len"]["values"]))
    rows = []
    for axis, spec in axes.items():
        cases = {}
        for value in spec["values"]:
            shape = {k: (value if spec[k] is None else spec[k]) for k in ("batch", "seq_len",
                                                                             "loops")}
            tokens = random_tokens(64, shape["batch"], shape["seq_len"], cfg)
            cases[str(value)] = inference(
                cfg, lambda t=tokens, r=shape["loops"]: model(t, loops=r))
        times = alternate(cases, cfg)
        config = {"arch": arch, "d_model": d_model, "n_layers": 2, "axis": axis, **spec}
        rows.append(_scaling_row(axis, spec["values"], times, config))
    return rows
