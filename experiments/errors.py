"""User errors of the loopscope commands: one line on stderr, exit status 2, no traceback.

Every problem that the user can fix — a bad override, an unreadable or mismatched checkpoint, a
directory that is not a run — is raised as a ``LoopscopeError`` (a ``ValueError``, so library
callers catch it the usual way); the console entry points print it with ``fail`` and exit with
``USAGE_EXIT`` (2, the status argparse and Hydra use for usage errors). Anything else is a bug and
keeps its traceback. A run that stopped on a non-finite loss exits with ``FAILED_EXIT`` (1).
"""

from __future__ import annotations

import sys
from typing import NoReturn

USAGE_EXIT = 2
FAILED_EXIT = 1


class LoopscopeError(ValueError):
    """A problem the user can fix, reported as one line (exit status 2)."""


class CheckpointError(LoopscopeError):
    """A checkpoint is missing, truncated, corrupt, or was written for another model config."""


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def fail(prog: str, message: str, status: int = USAGE_EXIT) -> NoReturn:
    """Print ``prog: error: message`` on stderr and exit with ``status``."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(status)
