"""Check a ``loopscope`` command line before Hydra runs it; word Hydra's errors as one line.

``preflight(args)`` composes every job the command line describes (each job of a sweep, up to
``MAX_PREFLIGHT_JOBS``), validates it (``experiments.config.validate``) and returns the first
problem as one line: an unknown group option and its choices, an unknown key and the valid keys of
its section, an override that does not parse, a launcher plugin that is not installed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

import experiments.conf  # noqa: F401  (registers the code's defaults with Hydra)
from experiments.config.store import register
from experiments.config.validate import ConfigError, validate_config

CONFIG_MODULE = "experiments.conf"
MAX_PREFLIGHT_JOBS = 64
PASS_THROUGH_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
                      "--shell-completion", "-sc", "--resolve", "--package", "-p")


def preflight(args: Sequence[str]) -> str | None:
    """Compose and validate every job the command line describes; the first problem as one line.

    Flags Hydra handles itself (``--help``, ``--cfg``, ...) skip the check.
    """
    if any(a in PASS_THROUGH_FLAGS or a.split("=")[0] in PASS_THROUGH_FLAGS for a in args):
        return None
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        return f"unknown option {flags[0]!r}; use key=value overrides, -m for a sweep, or --help"
    try:
        jobs = _expand(overrides) if multirun else [overrides]
    except Exception as err:  # hydra's override grammar errors
        return _describe(err, overrides)
    for job in jobs[:MAX_PREFLIGHT_JOBS]:
        problem = _check_job(job)
        if problem:
            return problem
    return None


def _expand(overrides: list[str]) -> list[list[str]]:
    """The override lists of every job of a sweep (cartesian product of sweep overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(combo) for combo in itertools.islice(itertools.product(*choices),
                                                      MAX_PREFLIGHT_JOBS)]


def _check_job(overrides: list[str]) -> str | None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()  # again: a task registered since the import gets its defaults node too
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            launcher = OmegaConf.select(cfg, "hydra.launcher._target_") or ""
            job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    except Exception as err:
        return _describe(err, overrides)
    finally:
        GlobalHydra.instance().clear()
    if "submitit" in launcher and not _importable("hydra_plugins.hydra_submitit_launcher"):
        return "the slurm launcher needs hydra-submitit-launcher: pip install 'loopscope[slurm]'"
    try:
        validate_config(job_cfg)
    except ConfigError as err:
        return str(err)
    return None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _describe(err: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra / OmegaConf error: what was wrong and the valid choices."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(err)
    if isinstance(err, OverrideParseException):
        first = text.strip().splitlines()[0] if text.strip() else "syntax error"
        return (f"cannot parse the overrides {' '.join(overrides)!r}: {first} "
                "(expected key=value, e.g. train.steps=100)")
    if isinstance(err, MissingConfigException) and getattr(err, "missing_cfg_file", None):
        missing = str(err.missing_cfg_file)
        group, _, option = missing.rpartition("/")
        if "submitit" in option:
            return ("the slurm launcher needs hydra-submitit-launcher: "
                    "pip install 'loopscope[slurm]'")
        options = list(getattr(err, "options", None) or [])
        if group:
            return (f"unknown {group} option {option!r}; choose from: "
                    f"{', '.join(sorted(options)) or '(none)'}")
    match = re.search(r"Could not override '([^']+)'", text) or re.search(
        r"Key '([^']+)' (?:is not in struct|not in)", text)
    if match:
        return _unknown_key_message(match.group(1), overrides)
    match = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if match:
        return f"{match.group(1)} already exists; override it without the leading '+'"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _unknown_key_message(key: str, overrides: list[str]) -> str:
    """Name the unknown key and list the valid keys of its parent section."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    parent, _, _ = key.rpartition(".")
    groups = [o for o in overrides if "=" in o and "." not in o.split("=")[0].lstrip("+~")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            base = compose("config", overrides=groups)
        node = OmegaConf.select(base, parent) if parent else base
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        valid = []
    finally:
        GlobalHydra.instance().clear()
    where = parent or "the config"
    listing = f"; valid keys in {where}: {', '.join(str(v) for v in valid)}" if valid else ""
    return f"unknown config key {key!r}{listing} (add a new key with +{key}=...)"
