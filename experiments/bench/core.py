"""The benchmark harness behind ``loopscope-bench``: side-by-side timing, memory probes, rows.

Every figure the suite reports is a RATIO measured side by side in one process (DESIGN.md,
"Performance claims live in benchmarks that print ratios measured side by side in one run"):

* ``alternate`` runs the compared callables interleaved — A B A B ... — after warm-up runs, with
  the same ``inner`` repetition count for every callable (calibrated so one measurement lasts at
  least ``min_time`` seconds), timed with ``time.perf_counter`` and a device synchronisation
  before and after each measurement on CUDA. Repetition ``i`` of A is divided by repetition ``i``
  of B, so slow drifts of a shared, noisy machine hit both sides of each ratio alike; a row reports
  the median of those per-repetition ratios and their min-max spread.
* ``peak_memory`` measures the peak bytes allocated while a callable runs. On CUDA it is
  ``torch.cuda.max_memory_allocated`` minus the allocation before the call. On CPU ``tracemalloc``
  does not see torch's allocator, so it replays the allocator's own ``[memory]`` events recorded
  by ``torch.profiler`` (``profile_memory=True``): allocations and frees in time order, cumulative
  sum, maximum (the peak above what was allocated when the call began).
* ``saved_tensor_bytes`` sums the bytes of the distinct storages autograd saves for backward while
  a callable runs (``torch.autograd.graph.saved_tensors_hooks``): the graph memory of a training
  step, reported beside the allocator peak.

A benchmark is a function ``fn(cfg: BenchConfig) -> list[Row]`` registered in ``BENCHMARKS``
(the project's one ``Registry``) and run by ``experiments.bench.main``.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from common.registry import Registry

BENCHMARKS: Registry[Callable[[BenchConfig], list[Row]]] = Registry("benchmark")

TARGET_OPS = ("<=", ">=", "<", ">")


@dataclass
class BenchConfig:
    """Settings shared by every benchmark of one ``loopscope-bench`` run.

    Attributes:
        quick: smaller sizes and fewer repetitions (the whole quick suite < 2 min on 2 cores).
        device: where models and solvers run.
        threads: ``torch.set_num_threads`` value used for the whole run (recorded in every row).
        reps: timed repetitions per compared callable (ABAB... pairs); ``None`` = the default
            of the mode (quick: 5, full: 11).
        warmup: untimed runs of each callable before timing.
        seed: ``torch.manual_seed`` at the start of every benchmark.
    """

    quick: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    threads: int = 1
    reps: int | None = None
    warmup: int = 2
    seed: int = 0

    @property
    def repetitions(self) -> int:
        return self.reps if self.reps is not None else (5 if self.quick else 11)

    @property
    def min_time(self) -> float:
        """Shortest duration of one timed measurement (seconds); shorter calls are repeated."""
        return 0.02 if self.quick else 0.05

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 on CUDA (the suite runs models in bf16 autocast there), none on CPU."""
        return torch.bfloat16 if self.device.type == "cuda" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context models run under: bf16 on CUDA, a no-op on CPU."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "quick": self.quick, "device": str(self.device), "threads": self.threads,
            "default_reps": self.repetitions, "warmup": self.warmup, "seed": self.seed,
            "autocast": str(self.autocast_dtype) if self.autocast_dtype else None,
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
        }


@dataclass
class Row:
    """One line of the benchmark table (and one record of ``bench.json``).

    Attributes:
        benchmark: suite item name (``overhead``, ``solvers``, ...).
        compared: what is divided by what, in words (``A / B``).
        median, low, high: median and min-max of the per-repetition ratios.
        target: e.g. ``"<= 1.05"``; ``None`` for an informational row.
        status: ``pass``, ``fail``, ``info`` (no target) or ``error`` (the benchmark raised).
        reps: the raw per-repetition ratios.
        raw: the raw measurements behind them (seconds per side, counts, bytes, ...).
        config: sizes and settings of this measurement plus the run's ``BenchConfig``.
        note: anything a reader needs to interpret the row (method, caveats, the cause of a miss).
    """

    benchmark: str
    compared: str
    median: float
    low: float
    high: float
    target: str | None
    status: str
    reps: list[float] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def make_row(benchmark: str, compared: str, ratios: list[float], target: str | None, *,
             raw: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
             note: str = "") -> Row:
    """A row from per-repetition ratios; ``target`` like ``"<= 1.05"`` is checked on the median."""
    if not ratios:
        raise ValueError(f"benchmark {benchmark!r}: no ratios measured for {compared!r}")
    median = statistics.median(ratios)
    status = "info" if target is None else ("pass" if meets(median, target) else "fail")
    return Row(benchmark, compared, median, min(ratios), max(ratios), target, status,
               list(ratios), raw or {}, config or {}, note)


def error_row(benchmark: str, err: BaseException) -> Row:
    """The row a benchmark that raised leaves in the table (the suite goes on)."""
    message = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    nan = float("nan")
    return Row(benchmark, "(benchmark raised)", nan, nan, nan, None, "error", note=message)


def meets(value: float, target: str) -> bool:
    """Whether ``value`` satisfies ``target`` (``"<= 1.05"``, ``">= 0.95"``, ``"< 1"``)."""
    op, _, bound = target.strip().partition(" ")
    if op not in TARGET_OPS:
        raise ValueError(f"target {target!r} must start with one of {TARGET_OPS} and a space")
    limit = float(bound)
    if not math.isfinite(value):
        return False
    return {"<=": value <= limit, ">=": value >= limit, "<": value < limit,
            ">": value > limit}[op]


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA kernels run asynchronously); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn: Callable[[], Any], inner: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / inner


def alternate(cases: dict[str, Callable[[], Any]], cfg: BenchConfig, *,
              reps: int | None = None, warmup: int | None = None) -> dict[str, list[float]]:
    """Seconds per call of each case, measured interleaved (A B A B ...) after warm-up.

    Every case gets the same ``inner`` count, calibrated on the slowest warm-up call so that one
    measurement lasts at least ``cfg.min_time``. ``reps``/``warmup`` override the config's
    (at least one warm-up call is always made: it calibrates ``inner``).

    Returns:
        ``{name: [seconds of repetition 0, 1, ...]}`` in the order of ``cases``.
    """
    if not cases:
        raise ValueError("alternate needs at least one case to time")
    slowest = 0.0
    for _ in range(max(cfg.warmup if warmup is None else warmup, 1)):
        for fn in cases.values():
            slowest = max(slowest, _measure(fn, 1, cfg.device))
    inner = max(1, math.ceil(cfg.min_time / max(slowest, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps if reps is not None else cfg.repetitions):
        for name, fn in cases.items():
            times[name].append(_measure(fn, inner, cfg.device))
    return times


def ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """Per-repetition ratios ``times[numerator][i] / times[denominator][i]``."""
    return [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ profiler's start/stop lines written straight to file descriptor 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated above the starting level while ``fn()`` runs (see module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return int(peak)


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return int(sum(seen.values()))


def loglog_slope(sizes: list[float], costs: list[float]) -> float:
    """Least-squares slope of log(cost) against log(size): the fitted scaling exponent."""
    if len(sizes) != len(costs) or len(sizes) < 2:
        raise ValueError(f"need >= 2 (size, cost) pairs of equal length, got {len(sizes)}, "
                         f"{len(costs)}")
    xs = [math.log(s) for s in sizes]
    ys = [math.log(c) for c in costs]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread


def _jsonable(value: Any) -> Any:
    """Plain JSON types: tensors to lists, NaN/inf to None, tuples to lists, devices to str."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return str(value)
