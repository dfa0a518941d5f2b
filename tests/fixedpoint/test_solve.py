"""Forward solves: every solver, per-sample stopping, traces, divergence, dtypes, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fixedpoint.problem import Problem
from fixedpoint.solve import SOLVERS, Solution, register_solver, solve

NATIVE = ["fixed_point_iter", "anderson", "broyden"]
TORCHDEQ = ["torchdeq.anderson", "torchdeq.broyden", "torchdeq.fixed_point_iter",
            "torchdeq.simple_fixed_point_iter"]


def weight(dim: int, norm: float, seed: int = 0, symmetric: bool = False,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (dim, dim) matrix with spectral norm ``norm`` (symmetric: eigenvalues in [-norm, norm])."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    if symmetric:
        q, _ = torch.linalg.qr(w)
        eig = torch.linspace(-norm, norm, dim, dtype=torch.float64)
        w = q @ torch.diag(eig) @ q.T
    else:
        w = norm * w / torch.linalg.matrix_norm(w, 2)
    return w.to(dtype)


class TanhMap:
    """f(z, rows) = tanh(c[rows] * z W + x[rows]); counts the rows it is evaluated on."""

    def __init__(self, w: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None,
                 nan_rows: tuple[int, ...] = ()) -> None:
        self.w, self.x = w, x
        self.scale = torch.ones(x.shape[0], dtype=x.dtype) if scale is None else scale
        self.nan_rows = torch.tensor(nan_rows, dtype=torch.long)
        self.rows_evaluated = 0
        self.calls = 0

    def __call__(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.rows_evaluated += z.shape[0]
        self.calls += 1
        scale = self.scale[rows].view(-1, *([1] * (z.dim() - 1)))  # (A, 1, ...)
        out = torch.tanh(scale * (z @ self.w) + self.x[rows])
        bad = torch.isin(rows, self.nan_rows)
        return torch.where(bad.view(-1, *([1] * (z.dim() - 1))), math.nan, out)


def rms_residual(f: TanhMap, z: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(z.shape[0])
    return (f(z, rows) - z).flatten(1).norm(dim=1) / math.sqrt(z[0].numel())


@pytest.mark.parametrize("name", NATIVE + TORCHDEQ)
@pytest.mark.parametrize("shape", [(5, 16), (3, 4, 8)])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_every_solver_finds_the_fixed_point(name: str, shape: tuple, stop_mode: str) -> None:
    torch.manual_seed(1)
    f = TanhMap(weight(shape[-1], 0.8), torch.randn(*shape))
    sol = solve(f, torch.zeros(shape), solver=name, tol=1e-6, max_iter=200,
                stop_mode=stop_mode, backward="implicit")
    assert sol.z.shape == shape
    assert sol.status_names == ["converged"] * shape[0]
    assert rms_residual(f, sol.z).max() < 5e-6  # ||f(z) - z|| checked directly
    assert sol.residuals.shape == (shape[0], int(sol.steps.max()))
    assert (sol.final_residual <= 1e-6).all()


def test_accelerated_solvers_need_fewer_evaluations_on_ill_conditioned_problem() -> None:
    torch.manual_seed(2)
    w = weight(32, 0.99, seed=3, symmetric=True)
    x = torch.randn(4, 32)
    f = lambda z, rows: z @ w + x[rows]  # linear: contraction exactly 0.99
    used = {}
    for name in NATIVE:
        sol = solve(f, torch.zeros(4, 32), solver=name, tol=1e-5, max_iter=3000, stop_mode="abs")
        assert sol.converged.all(), name
        used[name] = sol.evaluations
    assert used["anderson"] * 3 < used["fixed_point_iter"]
    assert used["broyden"] * 3 < used["fixed_point_iter"]


def mixed_batch(batch: int = 6, dim: int = 12) -> TanhMap:
    """Rows alternate between easy (contraction 0.3) and hard (0.95) samples."""
    torch.manual_seed(4)
    scale = torch.tensor([0.3 if i % 2 == 0 else 0.95 for i in range(batch)])
    return TanhMap(weight(dim, 1.0, seed=5), torch.randn(batch, dim), scale)


@pytest.mark.parametrize("name", NATIVE)
def test_per_sample_stopping_saves_rows_and_matches_solo_solves(name: str) -> None:
    f = mixed_batch()
    with torch.no_grad():  # with grad enabled, the implicit backward re-attaches with one call
        sol = solve(f, torch.zeros(6, 12), solver=name, tol=1e-6, max_iter=300, stop_mode="abs")
    assert sol.converged.all()
    easy, hard = sol.steps[0::2], sol.steps[1::2]
    assert easy.max() < hard.min()
    assert f.rows_evaluated == sol.evaluations == int(sol.steps.sum())
    assert f.rows_evaluated < 6 * f.calls  # frozen rows cost nothing
    for row in range(6):
        solo_f = TanhMap(f.w, f.x[row:row + 1], f.scale[row:row + 1])
        solo = solve(solo_f, torch.zeros(1, 12), solver=name, tol=1e-6, max_iter=300,
                     stop_mode="abs")
        assert int(solo.steps[0]) == int(sol.steps[row])
        torch.testing.assert_close(solo.z[0], sol.z[row], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NATIVE + TORCHDEQ)
def test_residuals_are_nan_exactly_after_each_stop(name: str) -> None:
    f = mixed_batch()
    sol = solve(f, torch.zeros(6, 12), solver=name, tol=1e-5, max_iter=60, record=True)
    assert sol.residuals.shape[1] == int(sol.steps.max())
    assert sol.states.shape == (sol.residuals.shape[1], 6, 12)
    for row in range(6):
        used = int(sol.steps[row])
        assert torch.isfinite(sol.residuals[row, :used]).all()
        assert torch.isnan(sol.residuals[row, used:]).all()
        assert torch.equal(sol.states[used - 1, row], sol.z[row])  # last iterate = z
        assert (sol.states[used:, row] == sol.z[row]).all()  # frozen state repeated


@pytest.mark.parametrize("name", NATIVE)
def test_recorded_states_reproduce_the_residual_trace(name: str) -> None:
    f = mixed_batch()
    sol = solve(f, torch.zeros(6, 12), solver=name, tol=1e-6, max_iter=40, record=True,
                stop_mode="abs")
    for j in range(sol.states.shape[0]):
        recomputed = rms_residual(f, sol.states[j])
        alive = j < sol.steps
        torch.testing.assert_close(recomputed[alive], sol.residuals[alive, j], rtol=1e-4,
                                   atol=1e-7)


@pytest.mark.parametrize("name", NATIVE + ["torchdeq.anderson"])
def test_return_best_returns_the_lowest_residual_iterate(name: str) -> None:
    f = mixed_batch()
    sol = solve(f, torch.zeros(6, 12), solver=name, tol=1e-12, max_iter=12, return_best=True,
                stop_mode="abs")
    best = torch.nan_to_num(sol.residuals, nan=math.inf).min(1).values
    torch.testing.assert_close(rms_residual(f, sol.z), best, rtol=1e-4, atol=1e-7)
    last = solve(f, torch.zeros(6, 12), solver=name, tol=1e-12, max_iter=12, stop_mode="abs")
    torch.testing.assert_close(rms_residual(f, last.z), last.final_residual, rtol=1e-4,
                               atol=1e-7)


def test_torchdeq_pass_through_agrees_with_native() -> None:
    f = mixed_batch()
    native = solve(f, torch.zeros(6, 12), solver="anderson", tol=1e-7, max_iter=200,
                   stop_mode="abs")
    for name in TORCHDEQ:
        other = solve(f, torch.zeros(6, 12), solver=name, tol=1e-7, max_iter=200,
                      stop_mode="abs")
        torch.testing.assert_close(other.z, native.z, rtol=0, atol=1e-4)
        assert (other.steps == other.steps[0]).all()  # torchdeq stops batch-wide
        assert other.evaluations == 6 * int(other.steps[0])


def test_torchdeq_pass_through_rejects_unknown_options() -> None:
    with pytest.raises(TypeError, match="beta"):
        solve(lambda z: 0.5 * z, torch.ones(2, 3), solver="torchdeq.anderson", beta=0.5)


@pytest.mark.parametrize("name", NATIVE)
def test_nan_row_is_isolated_bit_identically(name: str) -> None:
    f = mixed_batch()
    f.nan_rows = torch.tensor([3])
    sol = solve(f, torch.zeros(6, 12), solver=name, tol=1e-6, max_iter=300, stop_mode="rel")
    assert sol.status_names[3] == "diverged" and int(sol.steps[3]) == 1
    assert torch.isinf(sol.residuals[3, 0]) and torch.isnan(sol.residuals[3, 1:]).all()
    keep = torch.tensor([0, 1, 2, 4, 5])
    clean = TanhMap(f.w, f.x[keep], f.scale[keep])
    ref = solve(clean, torch.zeros(5, 12), solver=name, tol=1e-6, max_iter=300, stop_mode="rel")
    assert torch.equal(sol.z[keep], ref.z)
    assert torch.equal(sol.steps[keep], ref.steps)
    torch.testing.assert_close(sol.residuals[keep][:, : ref.residuals.shape[1]], ref.residuals,
                               rtol=0, atol=0, equal_nan=True)


def test_norm_explosion_is_diverged() -> None:
    gain = torch.tensor([2.0, 0.5])  # row 0 grows geometrically, row 1 contracts

    def f(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return gain[rows, None] * z + (rows == 0)[:, None].float()

    sol = solve(f, torch.ones(2, 4), solver="fixed_point_iter", tol=1e-6, max_iter=200,
                stop_mode="abs", diverge_factor=1e3)
    assert sol.status_names == ["diverged", "converged"]
    assert 5 < int(sol.steps[0]) < 20


def test_zero_fixed_point_converges_in_rel_mode() -> None:
    sol = solve(lambda z: 0.5 * z, torch.ones(3, 8), solver="fixed_point_iter", tol=1e-4,
                max_iter=100, stop_mode="rel")
    assert sol.converged.all() and int(sol.steps.max()) < 30


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_anderson_in_low_precision_converges(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(6)
    w = weight(16, 0.9, seed=7, dtype=dtype)
    x = torch.randn(4, 16).to(dtype)
    f = lambda z, rows: torch.tanh(z @ w + x[rows])
    sol = solve(f, torch.zeros(4, 16, dtype=dtype), solver="anderson", tol=tol, max_iter=100)
    assert sol.z.dtype == dtype and sol.converged.all()
    exact = solve(lambda z, rows: torch.tanh(z @ w.double() + x.double()[rows]),
                  torch.zeros(4, 16, dtype=torch.float64), solver="anderson", tol=1e-10,
                  max_iter=200).z
    assert (sol.z.double() - exact).norm() / exact.norm() < 5 * tol


def test_unknown_solver_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="anderson.*broyden.*fixed_point_iter"):
        solve(lambda z: z, torch.ones(2, 2), solver="newton")


def test_register_solver_adds_a_working_solver() -> None:
    def halved(problem: Problem, *, tau: float = 0.5) -> Solution:
        z = problem.z0
        while not problem.done:
            fz = problem.evaluate(z)
            keep = problem.observe(z, fz)
            if problem.done:
                break
            if keep is not None:
                z, fz = z[keep], fz[keep]
            z = (1 - tau) * z + tau * fz
        return problem.finish()

    if "test.halved" not in SOLVERS:
        register_solver("test.halved", halved)
    f = mixed_batch()
    sol = solve(f, torch.zeros(6, 12), solver="test.halved", tol=1e-6, max_iter=500,
                stop_mode="abs")
    assert sol.converged.all() and sol.solver == "test.halved"
    assert rms_residual(f, sol.z).max() < 5e-6
    with pytest.raises(ValueError, match="already registered"):
        register_solver("test.halved", lambda problem: None)
    with pytest.raises(TypeError, match="unexpected keyword"):
        solve(f, torch.zeros(6, 12), solver="test.halved", beta=1.0)


def test_empty_batch_returns_empty_solution() -> None:
    sol = solve(lambda z: z, torch.zeros(0, 4), solver="anderson")
    assert sol.z.shape == (0, 4) and sol.steps.shape == (0,) and sol.residuals.shape == (0, 0)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"z0": [1.0, 2.0]}, TypeError, "z0 must be a torch.Tensor"),
        ({"z0": torch.tensor(1.0)}, ValueError, "shape"),
        ({"z0": torch.ones(2, 3, dtype=torch.long)}, ValueError, "floating"),
        ({"tol": 0.0}, ValueError, "tol must be"),
        ({"tol": -1e-3}, ValueError, "tol must be"),
        ({"max_iter": 0}, ValueError, "max_iter must be"),
        ({"max_iter": 2.5}, ValueError, "max_iter must be"),
        ({"stop_mode": "max"}, ValueError, "stop_mode 'max'.*abs"),
        ({"backward": "adjoint"}, ValueError, "backward 'adjoint'.*implicit"),
        ({"f": 3}, TypeError, "f must be callable"),
        ({"phantom_steps": 0}, ValueError, "phantom_steps"),
        ({"m": 0}, ValueError, "m \\(Anderson memory\\)"),
    ],
)
def test_bad_input_is_named(kwargs: dict, error: type, match: str) -> None:
    call = {"f": lambda z: 0.5 * z, "z0": torch.ones(2, 3)} | kwargs
    with pytest.raises(error, match=match):
        solve(call.pop("f"), call.pop("z0"), **call)


def test_wrong_output_shape_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"expected \(2, 3\), received \(2, 4\)"):
        solve(lambda z: torch.zeros(2, 4), torch.ones(2, 3))


@pytest.mark.parametrize("name", NATIVE)
def test_solvers_run_inside_bf16_autocast(name: str) -> None:
    f = mixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = solve(f, torch.zeros(6, 12), solver=name, tol=1e-2, max_iter=100)
    assert sol.z.dtype == torch.float32 and sol.converged.all()
    assert rms_residual(f, sol.z).max() < 5e-2


@pytest.mark.parametrize("record", [False, True])
def test_blow_up_found_between_checks_freezes_the_row_at_the_crossing_iterate(record) -> None:
    # f(z) = a z + b per row: row 1 grows (a = 3), so its residual b 3^k crosses
    # diverge_factor (1e6) x its first residual b at k = 13, i.e. on its 14th evaluation, which
    # lies inside a blow-up check window (checks run every few iterations, not every one).
    a = torch.tensor([0.9, 3.0, 0.5, 0.99], dtype=torch.float64)[:, None]
    b = torch.tensor([1.0, 0.25, -2.0, 0.5], dtype=torch.float64)[:, None]
    z0 = torch.zeros(4, 3, dtype=torch.float64)
    sol = solve(lambda z, a, b: a * z + b, z0, inputs=(a, b), solver="fixed_point_iter",
                tol=1e-14, max_iter=40, stop_mode="abs", record=record)
    crossing = next(k for k in range(40) if 3.0 ** k > 1e6)  # 13: iterate z_13
    assert sol.status_names == ["max_iter", "diverged", "max_iter", "max_iter"]
    assert int(sol.steps[1]) == crossing + 1
    expected = 0.25 * (3.0 ** crossing - 1) / 2  # z_k of z <- 3 z + 0.25 from 0
    torch.testing.assert_close(sol.z[1], torch.full((3,), expected, dtype=torch.float64))
    assert torch.isfinite(sol.residuals[1, : crossing + 1]).all()
    assert torch.isnan(sol.residuals[1, crossing + 1:]).all()
    torch.testing.assert_close(sol.residuals[1, crossing], torch.tensor(
        0.25 * 3.0 ** crossing, dtype=torch.float64))
    assert torch.equal(sol.steps[[0, 2, 3]], torch.full((3,), 40))
    if record:
        assert torch.equal(sol.states[crossing:, 1], sol.z[1].expand(40 - crossing, 3))
        assert not torch.equal(sol.states[crossing - 1, 1], sol.z[1])


# -- fixed_point_iter's inlined loop (Problem.run_plain) against the general loop ----------------
def _mixed_rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f(z, x, a) = a * (z Q) + x, Q orthogonal: row b contracts at rate a_b (closed form)."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    a = torch.tensor([0.3, 0.5, 0.7, 0.9, 0.95, 3.0, 0.6, 0.8], dtype=torch.float64)[:, None]
    x = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    x[6] = math.nan  # NaN image at the first evaluation
    x[7] = 0.0  # z0 = 0 is already the fixed point
    return q.to(dtype), x.to(dtype), a.to(dtype)


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("form", ["inputs", "closure", "whole"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inlined_fixed_point_loop_equals_the_general_loop(monkeypatch, stop_mode, tau, form,
                                                          dtype):
    from fixedpoint.problem import Problem

    q, x, a = _mixed_rows(dtype)
    if form == "inputs":
        args = {"inputs": (x, a)}

        def f(z, x, a):
            return a * (z @ q) + x
    elif form == "closure":  # a plain f(z) over batch tensors: found out, then whole-batch
        args = {}

        def f(z):
            return a * (z @ q) + x
    else:  # a plain f(z) with nothing per-sample: runs on the active rows
        args = {}

        def f(z):
            return 0.9 * torch.tanh(z @ q) + 0.1
    z0 = torch.zeros(8, 16, dtype=dtype)
    options = dict(solver="fixed_point_iter", tol=1e-5, max_iter=60, stop_mode=stop_mode,
                   tau=tau, diverge_factor=1e3, **args)
    with torch.no_grad():
        fast = solve(f, z0, **options)
        monkeypatch.setattr(Problem, "plain_ok", property(lambda self: False))
        general = solve(f, z0, **options)
    assert torch.equal(fast.steps, general.steps)
    assert torch.equal(fast.status, general.status)
    torch.testing.assert_close(fast.z, general.z, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fast.residuals, general.residuals, rtol=0, atol=0, equal_nan=True)
    assert fast.evaluations == general.evaluations
    if form != "whole":  # the closed-form rows stop where they must
        names = fast.status_names
        if stop_mode == "abs":  # z <- 3z + x grows past the limit (its rel residual -> 2/3)
            assert names[5] == "diverged"
        assert names[6] == "diverged" and names[7] == "converged"
        assert int(fast.steps[7]) == 1 and int(fast.steps[6]) == 1
        assert len(set(fast.steps[:5].tolist())) > 1  # rows really stopped at different steps


def test_stop_tests_are_exact_at_the_tolerance_and_the_limit():
    """A residual exactly at tol converges; one exactly at the blow-up limit continues."""
    from fixedpoint.problem import Problem

    # z <- z + c: residual |c| every step; row 0 at tol exactly, row 1 just above
    tol = 0.25
    c = torch.tensor([[0.25], [0.2500001]], dtype=torch.float64)
    sol = solve(lambda z, c: z + c, torch.zeros(2, 1, dtype=torch.float64), inputs=(c,),
                solver="fixed_point_iter", tol=tol, max_iter=5, stop_mode="abs")
    assert sol.status_names == ["converged", "max_iter"]
    # z <- 2z + 1 from 0: residuals 1, 2, 4, 8 ...; limit 4 x the first -> diverged at the 4th
    problem = Problem(lambda z: 2 * z + 1, torch.zeros(1, 1), tol=1e-12, max_iter=20,
                      stop_mode="abs", diverge_factor=4.0)
    out = problem.run_plain(1.0)
    assert out.status_names == ["diverged"] and int(out.steps[0]) == 4
    assert out.residuals[0].tolist() == [1.0, 2.0, 4.0, 8.0]
