"""Hand the code's defaults to Hydra, so ``conf/*.yaml`` only say what differs from them.

Registered in Hydra's ``ConfigStore`` (plain, untyped nodes: the values are checked by
``experiments.config.validate``, which words every problem as one line):

* ``loopscope_defaults`` — the top-level keys and the ``train`` / ``eval`` / ``study`` sections
  from ``experiments.config.sections``; first in ``conf/config.yaml``'s defaults list.
* ``schema/task/<name>`` — every registered task's constructor parameters and their defaults;
  a task YAML starts with ``defaults: [/schema/task/<name>@_here_, _self_]``.
* ``schema/controller/<name>`` — every registered controller's constructor parameters and their
  defaults (``halting.controller_defaults``: the class signature is their one home); a controller
  YAML starts with ``defaults: [/schema/controller/<name>@_here_, _self_]``.
* ``schema/model/fields`` — the ``models.ModelConfig`` fields an experiment may set (the ones the
  task fills in and the per-option ``arch`` / ``window`` are left to the YAML), likewise.

Listing every key matters beyond the defaults: Hydra refuses a command-line override of a key the
composed config does not have (``task.min_len=3`` needs ``min_len`` to be there).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from hydra.core.config_store import ConfigStore

from experiments.config.sections import SECTIONS, RunConfig, defaults

# set from the task at run time, or chosen per model option (window must fit the task's length)
MODEL_FIELDS_LEFT_OUT = ("arch", "vocab_size", "max_seq_len", "halt_token_id", "window")


def run_defaults() -> dict[str, Any]:
    """Top-level keys plus the ``train`` / ``eval`` / ``study`` sections, all at their defaults."""
    return {**defaults(RunConfig), **{name: defaults(cls) for name, cls in SECTIONS.items()}}


def task_defaults(name: str) -> dict[str, Any]:
    """``name`` plus every constructor parameter of the task registered as ``name``."""
    from experiments.tasks import TASKS

    params = inspect.signature(TASKS.get(name).__init__).parameters
    return {"name": name, **{p.name: p.default for p in params.values() if p.name != "self"}}


def model_defaults() -> dict[str, Any]:
    """The ``ModelConfig`` fields (at their defaults) a model YAML may override."""
    from models.config import ModelConfig

    return {f.name: getattr(ModelConfig(), f.name) for f in dataclasses.fields(ModelConfig)
            if f.name not in MODEL_FIELDS_LEFT_OUT}


def register() -> None:
    """Put the defaults into Hydra's ``ConfigStore`` (idempotent; run before composing)."""
    from experiments.tasks import TASKS
    from halting import CONTROLLERS, controller_defaults

    store = ConfigStore.instance()
    store.store(name="loopscope_defaults", node=run_defaults())
    store.store(group="schema/model", name="fields", node=model_defaults())
    for name in TASKS:
        store.store(group="schema/task", name=name, node=task_defaults(name))
    for name in CONTROLLERS:
        store.store(group="schema/controller", name=name, node=controller_defaults(name))
