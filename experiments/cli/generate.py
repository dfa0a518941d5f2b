"""``loopscope-generate CHECKPOINT``: decode from a trained looped model, with per-token depths.

Usage::

    loopscope-generate run/model.safetensors --prompt "def main(" --loops 4 \\
        --controller convergence --param criterion=kl --param threshold=5e-4 --out trace.json

Prompts are text (``--prompt``, encoded as UTF-8 bytes: the byte-level ``pycode`` vocabulary, so
the model needs vocab_size >= 256) or ids (``--tokens "3 1 4"``); repeat either for a batch.
Prints each row's continuation (text when every id is a byte, else ids) and the loops each new
token used; ``--out`` writes one row per generated token (prompt, step, token, depth) as
``.json`` or ``.parquet``. Bad arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.errors import fail, one_line

PROG = "loopscope-generate"
BYTES = 256


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="Generate from a looped model with "
                                     "a KV cache; prints per-token depths.")
    parser.add_argument("checkpoint", help="a model .safetensors file written by loopscope")
    parser.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    parser.add_argument("--tokens", action="append", default=[],
                        help="prompt as space-separated ids (repeatable)")
    parser.add_argument("--loops", type=int, default=None,
                        help="loop cap (default: the checkpoint's training loops, else 2)")
    parser.add_argument("--controller", default="fixed", help="controller name (default fixed)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="controller parameter (repeatable), e.g. criterion=kl")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: 64, or fewer when the prompt leaves less room")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", type=int, action="append", default=[], help="stop token id")
    parser.add_argument("--mode", default="auto", choices=("auto", "parallel", "sequential"))
    parser.add_argument("--out", type=Path, default=None, help="per-token trace (.json|.parquet)")
    return parser.parse_args(argv)


def _params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            fail(PROG, f"--param must be KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text  # a bare string such as criterion=kl
    return params


def _prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    if not args.prompt and not args.tokens:
        fail(PROG, "give a prompt: --prompt TEXT or --tokens 'ID ID ...'")
    if args.prompt and vocab < BYTES:
        fail(PROG, f"--prompt needs a byte-level model (vocab_size >= {BYTES}); this one has "
             f"vocab_size={vocab}: use --tokens")
    rows = [list(text.encode("utf-8")) for text in args.prompt]
    for text in args.tokens:
        try:
            rows.append([int(word) for word in text.split()])
        except ValueError:
            fail(PROG, f"--tokens must be space-separated integers, got {text!r}")
    return rows


def _show(ids: list[int]) -> str:
    if ids and all(0 <= i < BYTES for i in ids):
        return repr(bytes(ids).decode("utf-8", errors="replace"))
    return " ".join(map(str, ids))


def trace_rows(out: Any) -> list[dict[str, int]]:
    """One row per generated token: prompt index, step, token id and loops used."""
    return [{"prompt": b, "step": s, "token": int(out.tokens[b, s]), "depth": int(out.depth[b, s])}
            for b in range(out.tokens.shape[0]) for s in range(int(out.lengths[b]))]


def write_trace(path: Path, rows: list[dict[str, int]]) -> None:
    from experiments.results import atomic_write, atomic_write_text

    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.DataFrame(rows, columns=["prompt", "step", "token", "depth"])
        atomic_write(path, frame.to_parquet)
    elif path.suffix == ".json":
        atomic_write_text(path, json.dumps(rows, indent=1))
    else:
        fail(PROG, f"--out must end in .json or .parquet, got {str(path)!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``loopscope-generate``."""
    from experiments.cli.tools import _load
    from halting import build_controller, generate

    args = parse_args(argv)
    model, meta = _load(PROG, Path(args.checkpoint))
    prompts = _prompts(args, model.vocab_size)
    loops = args.loops if args.loops is not None else int(meta.get("loops", 2))
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    room = model.config.max_seq_len + 1 - max(map(len, prompts))
    new = args.max_new_tokens if args.max_new_tokens is not None else max(0, min(64, room))
    try:
        controller = build_controller(args.controller, **_params(args.param))
        out = generate(model, prompts, controller, max_new_tokens=new,
                       max_loops=loops, temperature=args.temperature, top_k=args.top_k,
                       generator=generator, stop_tokens=args.stop, mode=args.mode)
    except (KeyError, ValueError, TypeError) as err:
        fail(PROG, one_line(err))
    for b, ids in enumerate(out.sequences()):
        depths = out.depth[b, : len(ids)].tolist()
        print(f"[{b}] {_show(prompts[b])} -> {_show(ids)}")
        print(f"[{b}] depth per token: {' '.join(map(str, depths))} "
              f"(mean {sum(depths) / max(1, len(depths)):.2f} of {out.max_loops}, {out.mode})")
    if args.out is not None:
        write_trace(args.out, trace_rows(out))
        print(f"trace: {args.out}")


if __name__ == "__main__":
    main()
