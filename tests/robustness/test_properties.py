"""Property tests (issue #7): random shapes, dtypes and values fed to the public API.

Each call either works (and returns what its contract says) or raises one of the documented
errors — ValueError, TypeError, KeyError — never anything else (no RuntimeError, IndexError or
LinAlgError from deep inside). ``max_examples`` is small so the whole file takes seconds.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixedpoint import classify, solve, spectral_radius
from halting import run_loop
from models import build_model

DOCUMENTED = (ValueError, TypeError, KeyError)
FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16,
                          torch.int64, torch.bool])
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.integers(-3, 50), st.just("x"), st.none())
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, fill: float | None, seed: int):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    if fill is not None and values.numel():
        values.view(-1)[0] = fill  # a NaN / Inf / huge value in one place
    return values.to(dtype)


def _maps(scale: float, kind: str):
    if kind == "contraction":
        return lambda z: scale * torch.tanh(z)
    if kind == "shape":
        return lambda z: z.reshape(z.shape[0], -1)[:, :1]
    if kind == "not a tensor":
        return lambda z: 1.0
    return lambda z: scale * z  # linear: converges, cycles or diverges with scale


MAP_KINDS = st.sampled_from(["contraction", "linear", "shape", "not a tensor"])
SCALES = st.sampled_from([0.5, -1.0, 1.5, 0.0])
FILLS = st.sampled_from([None, math.nan, math.inf, 1e30])


def _works_or_documented(call):
    try:
        return call()
    except DOCUMENTED:
        return None


@FAST
@given(shape=SHAPES, dtype=DTYPES, fill=FILLS, kind=MAP_KINDS, scale=SCALES, tol=NUMBERS,
       max_iter=NUMBERS, seed=st.integers(0, 9),
       solver=st.sampled_from(["anderson", "broyden", "fixed_point_iter", "newton"]),
       stop_mode=st.sampled_from(["rel", "abs", "max"]))
def test_solve_works_or_raises_a_documented_error(shape, dtype, fill, kind, scale, tol,
                                                   max_iter, seed, solver, stop_mode):
    z0 = _tensor(shape, dtype, fill, seed)
    sol = _works_or_documented(lambda: solve(_maps(scale, kind), z0, solver=solver, tol=tol,
                                             max_iter=max_iter, stop_mode=stop_mode))
    if sol is not None:
        assert sol.z.shape == z0.shape and sol.z.dtype == z0.dtype
        assert sol.steps.shape == (z0.shape[0],)
        assert sol.steps.numel() == 0 or int(sol.steps.max()) <= max_iter


@FAST
@given(shape=SHAPES, k=st.integers(0, 12), dtype=DTYPES, fill=FILLS, seed=st.integers(0, 9),
       tol=st.one_of(st.none(), NUMBERS), per_token=st.booleans(),
       with_map=st.sampled_from([None, "contraction", "linear", "shape"]))
def test_classify_works_or_raises_a_documented_error(shape, k, dtype, fill, seed, tol,
                                                      per_token, with_map):
    states = _tensor((k, *shape), dtype, fill, seed)
    f = None if with_map is None else _maps(0.5, with_map)
    verdicts = _works_or_documented(lambda: classify(states, f=f, tol=tol, per_token=per_token,
                                                     spectral_iters=4, lyapunov_steps=4))
    if verdicts is not None:
        assert len(verdicts) == math.prod(states.shape[1:3 if per_token else 2])
        assert set(verdicts.label) <= {"converged", "converging", "periodic", "quasi_periodic",
                                       "chaotic", "aperiodic", "drifting", "diverging",
                                       "undetermined"}


@FAST
@given(shape=SHAPES, dtype=DTYPES, fill=FILLS, kind=MAP_KINDS, scale=SCALES,
       iters=st.one_of(st.integers(-1, 6), st.just(2.5)), seed=st.integers(0, 9),
       method=st.sampled_from(["jvp", "vjp", "power"]))
def test_spectral_radius_works_or_raises_a_documented_error(shape, dtype, fill, kind, scale,
                                                            iters, seed, method):
    z = _tensor(shape, dtype, fill, seed)
    rho = _works_or_documented(lambda: spectral_radius(_maps(scale, kind), z, iters,
                                                       method=method))
    if rho is not None:
        assert rho.shape == (z.shape[0],)


ARCHS = st.sampled_from(["parallel_loop", "serial_loop", "recurrent_depth", "deq", "plt"])
FIELD_VALUES = st.one_of(st.integers(-2, 70), st.floats(-1, 2), st.just(math.nan), st.just("x"),
                         st.none(), st.booleans())


@FAST
@given(arch=ARCHS, fields=st.dictionaries(
    st.sampled_from(["d_model", "n_heads", "n_layers", "vocab_size", "max_seq_len", "window",
                     "dropout", "halt_token_id", "mlp_ratio", "d_modle"]),
    FIELD_VALUES, max_size=3))
def test_build_model_works_or_raises_a_documented_error(arch, fields):
    base = dict(d_model=16, n_heads=2, n_layers=1, vocab_size=8, max_seq_len=8, window=4)
    model = _works_or_documented(lambda: build_model(arch, **{**base, **fields}))
    if model is not None:
        assert model.config.arch == arch


@FAST
@given(arch=st.sampled_from(["parallel_loop", "serial_loop", "recurrent_depth", "deq"]),
       shape=st.lists(st.integers(0, 10), min_size=1, max_size=3).map(tuple),
       dtype=st.sampled_from([torch.long, torch.int32, torch.float32]),
       high=st.sampled_from([8, 9, -1]), seed=st.integers(0, 9),
       controller=st.sampled_from(["fixed", "convergence", "solver", "act", "pondernet",
                                   "ouro_gate", "halt_token", "q_halt", "pondr"]),
       max_loops=st.sampled_from([1, 3, 0, -1, 2.5]),
       granularity=st.sampled_from(["sample", "token", "batch"]))
def test_run_loop_works_or_raises_a_documented_error(arch, shape, dtype, high, seed, controller,
                                                     max_loops, granularity):
    torch.manual_seed(seed)
    model = build_model(arch, d_model=16, n_heads=2, n_layers=1, vocab_size=8, max_seq_len=8,
                        window=4,
                        halt_token_id=7 if seed % 2 else None)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 8, shape, generator=generator).to(dtype)
    if tokens.numel() and high != 8:
        tokens.view(-1)[0] = high  # one id outside the vocabulary
    out = _works_or_documented(lambda: run_loop(model, tokens, controller, max_loops=max_loops,
                                                granularity=granularity))
    if out is not None:
        assert out.logits.shape == (*tokens.shape, 8)
        assert int(out.depth.max()) <= max_loops and torch.isfinite(out.logits).all()
