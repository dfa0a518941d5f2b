"""Integrity of a run directory: one config per directory, one run at a time.

* **Fingerprint.** ``fingerprint.json`` holds a SHA-256 over everything that determines the
  results (the validated config and the effective seed, minus the keys listed in
  ``NOT_RESULT_KEYS`` that only change how a run is shown or scheduled) and the flattened config
  itself. A re-run in the same directory with another config is refused with one line naming the
  differing keys (exit 2) — checkpoints of one config are never resumed, or a finished run
  skipped, under another. A directory that holds a run but no fingerprint (an older loopscope)
  is refused too: nothing says what it was made with.
* **Lock.** ``.lock`` is locked with ``fcntl.flock`` while the run lives and ``.lock.owner``
  names the owner's pid and host, so a second concurrent run in the same directory is refused
  with one line naming the owner. The kernel drops the lock when its owner dies, so the owner
  record left by a killed run is stale by construction: the next run takes it over (and says
  so). Where ``fcntl`` is missing (Windows) the pid in the record is checked instead.
* **Output directory.** ``prepare_out_dir`` turns an ``out_dir`` that is a file, or cannot be
  created or written, into one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from experiments.errors import LoopscopeError

FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
# config keys that never change a result: where it goes, how it is shown, how many processes
# train (results do not depend on train.workers: each model seeds its own streams), and the
# decode-latency timing (decode.json: wall-clock, outside the results tables)
NOT_RESULT_KEYS = ("out_dir", "train.progress", "train.workers", "eval.figures",
                   "eval.decode_tokens", "eval.decode_batch")
MAX_LISTED_KEYS = 6


class RunDirError(LoopscopeError):
    """The run directory cannot be used for this run (one line, exit status 2)."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}`` (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def result_config(conf: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The flattened keys that determine the results, with the effective (job) seed."""
    flat = {k: v for k, v in flatten(conf).items()
            if not any(k == skip or k.startswith(f"{skip}.") for skip in NOT_RESULT_KEYS)}
    flat["seed"] = seed
    flat.update(checkpoint_identities(conf))
    return flat


def checkpoint_identities(conf: Mapping[str, Any]) -> dict[str, str]:
    """``<model section>.checkpoint_sha256`` of every Hugging Face checkpoint the run reads
    (``models.hf.checkpoint_identity``): a checkpoint replaced at the same path changes the
    fingerprint, so its old run is never resumed or skipped."""
    sections = dict(conf.get("study", {}).get("models") or {})
    where = {f"study.models.{k}": v for k, v in sections.items()} if sections else \
        {"model": conf.get("model", {})}
    found = {}
    for name, section in where.items():
        if isinstance(section, Mapping) and section.get("arch") in ("hf", "hf_retrofit"):
            from models.hf import checkpoint_identity

            found[f"{name}.checkpoint_sha256"] = checkpoint_identity(section["path"])
    return found


def config_hash(flat: Mapping[str, Any]) -> str:
    """SHA-256 of a flattened config (keys sorted; JSON with ``repr`` for odd values)."""
    text = json.dumps(dict(sorted(flat.items())), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def prepare_out_dir(out: Path) -> None:
    """Create ``out`` (and parents); ``RunDirError`` if it is a file or not writable."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"out_dir {str(out)!r} is an existing file, not a directory; "
                          "choose another out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # root ignores permission bits, so os.access would say yes: try a real file instead
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test_"):
            pass
    except OSError as err:
        raise RunDirError(f"out_dir {str(out)!r} cannot be written ({err.strerror or err}); "
                          "choose a writable out_dir") from None


def check_fingerprint(out: Path, flat: Mapping[str, Any]) -> None:
    """Store the fingerprint of a new run, or check it against the stored one.

    Raises:
        RunDirError: the directory was made with another config (the differing keys named), or
            holds a run without a fingerprint.
    """
    path = out / FINGERPRINT_FILE
    digest = config_hash(flat)
    if not path.is_file():
        if (out / "status.json").exists() or (out / "models").exists():
            raise RunDirError(f"{str(out)!r} holds a run without {FINGERPRINT_FILE} (made by an "
                              "older loopscope?); its config is unknown, so it is not resumed: "
                              "use a new out_dir or delete the directory")
        from experiments.results import atomic_write_text

        atomic_write_text(path, json.dumps({"hash": digest, "config": dict(flat)}, indent=1,
                                           default=repr))
        return
    try:
        stored = json.loads(path.read_text())
        stored_hash, stored_cfg = stored["hash"], stored["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunDirError(f"cannot read {str(path)!r} ({err}); use a new out_dir or delete "
                          "the directory") from None
    if stored_hash == digest:
        return
    now = json.loads(json.dumps(dict(flat), default=repr))  # the form it was stored in
    keys = sorted(k for k in set(stored_cfg) | set(now) if stored_cfg.get(k) != now.get(k))
    shown = ", ".join(f"{k} ({stored_cfg.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r})"
                      for k in keys[:MAX_LISTED_KEYS])
    more = f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
    raise RunDirError(f"{str(out)!r} was made with another config: {shown or 'hash differs'}"
                      f"{more}; use a new out_dir, or delete the directory to start over")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of run directory ``out`` for the body.

    The lock lives on ``.lock`` (never written, so never half-written); the owner's record is
    replaced atomically in ``.lock.owner``.

    Raises:
        RunDirError: another live process holds it (its pid named).
    """
    from experiments.results import atomic_write_text

    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    owner_file = out / OWNER_FILE
    try:
        previous = _acquire(fd, out)
    except BaseException:
        os.close(fd)
        raise
    try:
        if previous.get("pid") and previous.get("pid") != os.getpid():
            print(f"loopscope: took over the stale lock of pid {previous['pid']} (no longer "
                  f"running) in {out}", flush=True)
        atomic_write_text(owner_file, json.dumps({"pid": os.getpid(),
                                                  "host": socket.gethostname()}))
        yield
    finally:
        with contextlib.suppress(OSError):
            owner_file.unlink()  # a clean exit leaves no owner behind
        os.close(fd)  # releases the flock


def _read_owner(out: Path) -> dict[str, Any]:
    try:
        owner = json.loads((out / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _acquire(fd: int, out: Path) -> dict[str, Any]:
    """Lock ``fd``; return the previous owner's record (stale: its process is gone)."""
    previous = _read_owner(out)
    try:
        import fcntl
    except ImportError:  # no flock: a live pid in the owner record means the lock is held
        pid = previous.get("pid")
        same_host = previous.get("host") in (None, socket.gethostname())
        if isinstance(pid, int) and pid != os.getpid() and same_host and _pid_alive(pid):
            raise _held(out, previous) from None
        return previous
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise _held(out, _read_owner(out)) from None
    return _read_owner(out)


def _held(out: Path, owner: dict[str, Any]) -> RunDirError:
    who = f"pid {owner['pid']} on {owner.get('host', '?')}" if owner.get("pid") else "another run"
    return RunDirError(f"{str(out)!r} is in use by another loopscope run ({who}); wait for it "
                       "to finish or choose another out_dir")
