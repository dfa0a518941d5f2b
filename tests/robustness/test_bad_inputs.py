"""Bad input, table-driven (issue #7): every case gets one clear line, never a traceback.

Command-line cases run ``experiments.cli.app.main`` in-process (the same code as the console script,
fast) and assert exit status 2, the key words of the message and no "Traceback" on stderr; two
cases also run the real console entry point in a subprocess. API cases call the public functions
of ``fixedpoint``, ``halting`` and ``models`` and assert the documented exception type (ValueError,
TypeError or KeyError) and the key words (the bad value and what was expected).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli.app import main
from fixedpoint import classify, solve, spectral_radius
from halting import run_loop
from models import build_model

ROOT = Path(__file__).resolve().parents[2]

# (argv, key words of the one-line message); every case must exit with status 2
CLI_CASES: dict[str, tuple[list[str], list[str]]] = {
    "unknown controller option": (["controller=pondr"], ["pondr", "pondernet", "act"]),
    "unknown model option": (["model=plt"], ["plt", "parallel_loop", "deq"]),
    "unknown task option": (["task=sudoku"], ["sudoku", "parity", "s5"]),
    "unknown experiment": (["experiment=nope"], ["nope", "smoke", "default"]),
    "unknown launcher": (["hydra/launcher=nope"], ["nope", "joblib"]),
    "unknown key": (["train.stepz=3"], ["train.stepz", "steps", "batch_size"]),
    "unknown key added with +": (["+train.stepz=3"], ["train.stepz", "steps"]),
    "unknown top-level key": (["foo=1"], ["foo"]),
    "unknown command-line flag": (["--foo"], ["--foo"]),
    "wrong type int": (["train.steps=abc"], ["train.steps", "abc", "integer"]),
    "wrong type float": (["train.lr=fast"], ["train.lr", "fast", "number"]),
    "infinite learning rate": (["train.lr=inf"], ["train.lr", "inf", "(0, inf)"]),
    "wrong type bool": (["train.progress=maybe"], ["train.progress", "maybe", "true or false"]),
    "wrong type list": (["train.steps=[1,2]"], ["train.steps", "integer"]),
    "float where int": (["train.steps=1.5"], ["train.steps", "1.5", "integer"]),
    "loops < 1": (["controller.loops=0"], ["loops", "0"]),
    "max_loops < 1": (["study.max_loops=0"], ["study.max_loops", "0", ">= 1"]),
    "tolerance 0": (["controller=solver", "controller.tol=0"], ["tol", "0"]),
    "threshold < 0": (["controller=convergence", "controller.threshold=-1"],
                      ["threshold", "-1"]),
    "tolerance nan": (["controller=solver", "controller.tol=nan"], ["tol", "nan", "finite"]),
    "probability 0": (["controller=ouro_gate", "controller.q=0"], ["q", "0", "(0.0, 1.0]"]),
    "probability > 1": (["controller=pondernet", "controller.lambda_prior=1.5"],
                        ["lambda_prior", "1.5"]),
    "halting threshold > 1": (["controller=pondernet", "controller.threshold=1.5"],
                              ["threshold", "1.5", "(0.0, 1.0]"]),
    "window > sequence": (["model.window=999"], ["window", "999", "sequence length"]),
    "window 0": (["model.window=0"], ["window", "0"]),
    "d_model not divisible": (["model.d_model=33"], ["d_model", "33", "n_heads"]),
    "negative seed": (["seed=-1"], ["seed", "-1", ">= 0"]),
    "unknown split": (["eval.splits=[test]"], ["eval.splits", "test", "val"]),
    "empty budgets": (["eval.budgets=[]"], ["eval.budgets", "non-empty"]),
    "unknown device": (["train.device=tpu"], ["train.device", "tpu", "cpu"]),
    "unknown criterion": (["controller=convergence", "controller.criterion=magic"],
                          ["magic", "kl", "residual"]),
    "unknown solver": (["controller=solver", "controller.solver=newton"],
                       ["newton", "anderson", "broyden"]),
    "unroll with anderson": (["controller=solver", "controller.backward=unroll"],
                             ["unroll", "anderson", "fixed_point_iter"]),
    "task range inverted": (["task.min_len=5", "task.max_len=3"], ["min_len=5", "max_len=3"]),
    "halt_token without halt token": (["controller=halt_token", "+model.halt_token_id=null"],
                                      ["halt_token", "halt_token_id", "model"]),
    "max_loops < min_loops": (["controller=convergence", "controller.min_loops=10",
                               "study.max_loops=4"], ["max_loops 4", "min_loops 10"]),
    "eval budget < min_loops": (["experiment=smoke", "eval.budgets=[2]",
                                 "+eval.controllers.c2={name: convergence, min_loops: 3}"],
                                ["max_loops 2", "min_loops 3", "eval.budgets"]),
    "token granularity, sample-only controller": (
        ["controller=q_halt", "train.granularity=token"], ["granularity=token", "q_halt",
                                                           "sample"]),
    "token granularity in eval": (["experiment=smoke", "eval.granularity=token"],
                                  ["granularity=token", "solver", "sample"]),
    "bad job in a sweep": (["-m", "train.steps=1,abc"], ["train.steps", "abc"]),
    "bad option in a sweep": (["-m", "controller=fixed,pondr"], ["pondr", "pondernet"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES), ids=list(CLI_CASES))
def test_cli_bad_input_exits_2_with_one_clear_line(case, capsys, tmp_path, monkeypatch):
    argv, words = CLI_CASES[case]
    monkeypatch.chdir(tmp_path)  # a run that slipped through would write here
    with pytest.raises(SystemExit) as exited:
        main([*argv, f"out_dir={tmp_path / 'out'}"] if "-m" not in argv else argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loopscope: error: "), err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert list(tmp_path.iterdir()) == [], "a rejected run created files"


@pytest.mark.parametrize("argv, words", [
    (["controller=pondr"], ["pondr", "pondernet"]),
    (["train.steps=abc"], ["train.steps", "abc"]),
])
def test_console_script_bad_input_exit_status_2_no_traceback(argv, words, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments", *argv, f"out_dir={out}",
                           f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert all(word in proc.stderr for word in words), proc.stderr
    assert list(tmp_path.iterdir()) == [], "a rejected run created files"


# -- API misuse ----------------------------------------------------------------------------------
def _model(**overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=8, max_seq_len=8, d_model=32, n_heads=2, n_layers=1, window=4)
    return build_model("parallel_loop", **{**fields, **overrides})


def _tokens(*shape, **kw):
    return torch.zeros(shape, dtype=kw.pop("dtype", torch.long), **kw)


def _half(z):
    return 0.5 * z


# (call, exception type, key words of the message)
API_CASES = {
    "solve: z0 not a tensor": (lambda: solve(_half, [[0.0]]), TypeError, ["z0", "list"]),
    "solve: integer z0": (lambda: solve(_half, torch.zeros(3, 4, dtype=torch.long)),
                          ValueError, ["z0", "floating", "int64"]),
    "solve: 0-dim z0": (lambda: solve(_half, torch.tensor(1.0)), ValueError, ["(B, ...)", "()"]),
    "solve: f changes the shape": (lambda: solve(lambda z: z[:, :2], torch.zeros(3, 4)),
                                   ValueError, ["expected (3, 4)", "received (3, 2)"]),
    "solve: f returns no tensor": (lambda: solve(lambda z: [1], torch.zeros(3, 4)), TypeError,
                                   ["Tensor", "list"]),
    "solve: f moves to another device": (
        lambda: solve(lambda z: z.to("meta"), torch.zeros(3, 4)), ValueError, ["device", "meta",
                                                                                "cpu"]),
    "solve: unknown solver": (lambda: solve(_half, torch.zeros(3, 4), solver="newton"), KeyError,
                              ["newton", "anderson"]),
    "solve: tol <= 0": (lambda: solve(_half, torch.zeros(3, 4), tol=0.0), ValueError,
                        ["tol", "> 0"]),
    "solve: unknown option": (lambda: solve(_half, torch.zeros(3, 4), foo=1), TypeError, ["foo"]),
    "classify: not a tensor": (lambda: classify([1, 2]), TypeError, ["states", "list"]),
    "classify: integer states": (lambda: classify(torch.zeros(10, 3, 4, dtype=torch.long)),
                                 TypeError, ["floating", "int64"]),
    "classify: too short": (lambda: classify(torch.zeros(3, 3, 4)), ValueError, ["K >= 8", "K=3"]),
    "classify: tol out of range": (lambda: classify(torch.randn(10, 3, 4), tol=-1.0), ValueError,
                                   ["tol", "-1.0"]),
    "classify: map changes the shape": (
        lambda: classify(torch.randn(10, 3, 4), f=lambda z: z[:1]), ValueError,
        ["expected (3, 4)", "received (1, 4)"]),
    "spectral_radius: iters < 2": (lambda: spectral_radius(_half, torch.zeros(3, 4), 1),
                                   ValueError, ["iters", ">= 2"]),
    "spectral_radius: integer z": (
        lambda: spectral_radius(_half, torch.zeros(3, 4, dtype=torch.long), 5), TypeError,
        ["floating", "int64"]),
    "spectral_radius: f not callable": (lambda: spectral_radius(3, torch.zeros(3, 4), 5),
                                        TypeError, ["callable", "int"]),
    "run_loop: float tokens": (lambda: run_loop(_model(), _tokens(2, 4, dtype=torch.float32),
                                                "fixed", max_loops=2),
                               TypeError, ["int64", "float32"]),
    "run_loop: 1-d tokens": (lambda: run_loop(_model(), _tokens(4), "fixed", max_loops=2),
                             TypeError, ["(B, T)", "(4,)"]),
    "run_loop: token id out of vocabulary": (
        lambda: run_loop(_model(), torch.full((2, 4), 99), "fixed", max_loops=2), ValueError,
        ["99", "vocab_size"]),
    "run_loop: sequence too long": (lambda: run_loop(_model(), _tokens(2, 20), "fixed",
                                                     max_loops=2),
                                    ValueError, ["T=20", "max_seq_len=8"]),
    "run_loop: tokens on another device": (
        lambda: run_loop(_model(), _tokens(2, 4, device="meta"), "fixed", max_loops=2),
        ValueError, ["device meta", "cpu"]),
    "run_loop: max_loops 0": (lambda: run_loop(_model(), _tokens(2, 4), "fixed", max_loops=0),
                              ValueError, ["max_loops", ">= 1", "0"]),
    "run_loop: unknown controller": (lambda: run_loop(_model(), _tokens(2, 4), "pondr",
                                                      max_loops=2),
                                     KeyError, ["pondr", "pondernet"]),
    "run_loop: token granularity, sample-only": (
        lambda: run_loop(_model(), _tokens(2, 4), "solver", max_loops=2, granularity="token"),
        ValueError, ["solver", "token", "sample"]),
    "run_loop: not a model": (lambda: run_loop(object(), _tokens(2, 4), "fixed", max_loops=2),
                              TypeError, ["LoopedModel", "object"]),
    "run_loop: halt_token without a halt token": (
        lambda: run_loop(_model(), _tokens(2, 4), "halt_token", max_loops=2), ValueError,
        ["halt_token", "halt_token_id"]),
    "run_loop: min_loops > max_loops": (
        lambda: run_loop(_model(), _tokens(2, 4), "fixed", max_loops=2, min_loops=3), ValueError,
        ["max_loops=2", "min_loops=3"]),
    "build_model: unknown arch": (lambda: build_model("plt"), KeyError, ["plt", "parallel_loop"]),
    "build_model: unknown field": (lambda: build_model("parallel_loop", d_modle=3), KeyError,
                                   ["d_modle", "d_model"]),
    "build_model: wrong type": (lambda: build_model("parallel_loop", d_model="x"), ValueError,
                                ["d_model", "'x'"]),
    "build_model: out of range": (lambda: build_model("parallel_loop", dropout=2.0), ValueError,
                                  ["dropout", "2.0", "[0, 1)"]),
    "build_model: not a config": (lambda: build_model(3), TypeError, ["ModelConfig", "int"]),
    "build_model: halt token outside vocab": (
        lambda: build_model("parallel_loop", vocab_size=8, halt_token_id=9), ValueError,
        ["halt_token_id=9", "[0, 7]"]),
    "forward: loops 0": (lambda: _model()(_tokens(2, 4), loops=0), ValueError, ["loops", "0"]),
}


@pytest.mark.parametrize("case", list(API_CASES), ids=list(API_CASES))
def test_api_misuse_raises_the_documented_error(case):
    call, error, words = API_CASES[case]
    with pytest.raises(error) as raised:
        call()
    message = raised.value.args[0] if isinstance(raised.value, KeyError) else str(raised.value)
    for word in words:
        assert word in str(message), f"{word!r} not in {message!r}"


def test_there_are_at_least_25_bad_inputs_of_each_kind():
    assert len(CLI_CASES) >= 25 and len(API_CASES) >= 25
