"""One up-front validation pass over a composed loopscope config, before any training.

Hydra composes the config; this module checks it completely and turns every problem into one
``ConfigError`` line that names the bad key, its value and what is allowed (the app prints it and
exits with status 2, no traceback). It checks

* unknown keys at every level (``+train.stepz=3`` is caught here; plain ``train.stepz=3`` is
  already refused by Hydra's struct mode, and the app reformats that error the same way);
* types and ranges of the top-level keys and the ``train`` / ``eval`` / ``study`` sections, derived
  from the typed fields of ``experiments.config.sections`` (annotation + declared ``Check``);
* the ``model``, ``task`` and every controller section by *building* them with their owners'
  validating constructors (``models.ModelConfig.from_dict``, ``experiments.tasks.build_task``,
  ``halting.build_controller``), so the rules live in one place and the message says which
  section was wrong;
* combinations: ``window`` longer than the task's sequence, a budget below a controller's
  ``min_loops``, ``halt_token`` without a halt token in the model/task, token granularity with a
  sample-only controller, randomised depth with a learned objective's ``min_loops``.

The values are checked here rather than by Hydra's typed structured configs so every problem gets
this module's one-line message; the model, task and controller sections are open-ended per option
and validated by their owners.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.config.sections import (
    INF,
    Check,
    EvalConfig,
    RunConfig,
    StudyConfig,
    TrainConfig,
    field_check,
    field_types,
)
from experiments.errors import LoopscopeError

TOP_KEYS = ("seed", "out_dir", "threads", "model", "controller", "task", "study", "train", "eval")
# model fields the app fills in from the task at run time
TASK_MODEL_FIELDS = ("vocab_size", "max_seq_len")


class ConfigError(LoopscopeError):
    """A configuration problem, reported as one line (exit status 2)."""


@dataclass(frozen=True)
class Rule:
    """Type and range rule of one scalar or list config key."""

    types: tuple[type, ...]
    check: Callable[[Any], bool] = lambda value: True
    allowed: str = ""
    nullable: bool = False


def _int(low: int, high: float | None = None) -> Rule:
    if high is None:
        return Rule((int,), lambda v: v >= low, f"an integer >= {low}")
    return Rule((int,), lambda v: low <= v <= high, f"an integer >= {low} and <= {high}")


def _num(check: Check) -> Rule:
    low = -INF if check.low is None else check.low
    high = INF if check.high is None else check.high

    def ok(v: float) -> bool:
        above = v > low if check.low_open else v >= low
        below = v < high if check.high_open else v <= high
        return above and below

    lo, hi = "(" if check.low_open else "[", ")" if check.high_open else "]"
    return Rule((int, float), ok, f"a number in {lo}{low}, {high}{hi}")


def _list(item: type, check: Check) -> Rule:
    if item is str:
        def ok(v: list) -> bool:
            return (len(v) > 0 or not check.non_empty) and all(s in check.choices for s in v)

        return Rule((list,), ok, f"a {'non-empty ' if check.non_empty else ''}list of "
                                 f"{', '.join(check.choices)}")
    low = check.low

    def ok_ints(v: list) -> bool:
        fine = all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in v)
        return fine and (len(v) > 0 or not check.non_empty)

    return Rule((list,), ok_ints, f"a {'non-empty ' if check.non_empty else ''}list of integers "
                                  f">= {low}")


def _scalar(kind: type, check: Check) -> Rule:
    if kind is bool:
        return BOOL
    if kind is int:
        return _int(int(check.low), None if check.high is None else int(check.high))
    if kind is float:
        return _num(check)
    if kind is dict:
        return Rule((dict,))
    if check.choices:
        return Rule((str,), lambda v: v in check.choices, f"one of {', '.join(check.choices)}")
    if check.non_empty:
        return Rule((str,), lambda v: len(v) > 0, "a non-empty string")
    return Rule((str,))


def rule_of(annotation: Any, check: Check) -> Rule:
    """The ``Rule`` of one settings field, from its type annotation and its declared ``Check``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    nullable = type(None) in typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if nullable:
        annotation, origin = args[0], typing.get_origin(args[0])
    if origin is list:
        rule = _list(typing.get_args(annotation)[0], check)
    else:
        rule = _scalar(origin or annotation, check)
    if check.test is not None:
        rule = Rule(rule.types, check.test, rule.allowed)
    allowed = check.allowed or (f"null or {rule.allowed}" if nullable else rule.allowed)
    return Rule(rule.types, rule.check, allowed, nullable)


def rules_of(cls: type) -> dict[str, Rule]:
    """Field name -> ``Rule`` of every field of a settings dataclass (``sections``)."""
    types = field_types(cls)
    return {f.name: rule_of(types[f.name], field_check(cls, f.name))
            for f in dataclasses.fields(cls)}


BOOL = Rule((bool,), allowed="true or false")
# evaluation attends over (eval batch, heads, T, T): longer sequences exhaust memory after training
MAX_SEQ_LEN = 2048
TRAIN_RULES = rules_of(TrainConfig)
EVAL_RULES = rules_of(EvalConfig)
STUDY_RULES = rules_of(StudyConfig)
TOP_RULES = rules_of(RunConfig)


@dataclass
class ValidConfig:
    """The checked config as plain containers, plus the objects built while checking it.

    Attributes:
        cfg: the whole config as a plain dict (no ``hydra`` key).
        task: the built ``experiments.tasks.Task``.
        models: architecture key -> full ``ModelConfig`` field dict (task fields filled in); a
            Hugging Face checkpoint: ``build_model``'s fields (``_check_hf_model``), with
            ``as_loaded`` set when the study evaluates it without training.
        train, evaluation, study: the checked sections as typed settings (``sections``).
    """

    cfg: dict[str, Any]
    task: Any
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: TrainConfig | None = None
    evaluation: EvalConfig | None = None
    study: StudyConfig | None = None


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> ValidConfig:
    """Check a composed config completely; raise ``ConfigError`` (one line) on the first problem.

    Args:
        cfg: the composed Hydra config (``hydra`` key, if present, is ignored) or a plain mapping.

    Returns:
        ValidConfig with the plain config, the built task and each model's full field dict.
    """
    plain = _to_plain(cfg)
    _check_keys(plain, TOP_KEYS, "config")
    _check_section(plain, TOP_RULES, "", partial=True)
    for name, rules in (("train", TRAIN_RULES), ("eval", EVAL_RULES), ("study", STUDY_RULES)):
        section = plain[name]
        if not isinstance(section, dict):
            raise ConfigError(f"{name} must be a mapping, got {section!r}")
        _check_section(section, rules, f"{name}.")
    _check_device(plain["train"]["device"])
    task = _build_task(plain["task"])
    models = _check_models(plain, task)
    _check_controllers(plain, models)
    _check_as_loaded(plain, models)
    return ValidConfig(cfg=plain, task=task, models=models, train=TrainConfig(**plain["train"]),
                       evaluation=EvalConfig(**plain["eval"]), study=StudyConfig(**plain["study"]))


def _to_plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        try:
            container = OmegaConf.to_container(cfg, resolve=True)
        except Exception as err:  # interpolation errors from omegaconf
            raise ConfigError(f"cannot resolve the config: {_first_line(err)}") from None
    elif isinstance(cfg, Mapping):
        container = dict(cfg)
    else:
        raise ConfigError(f"config must be a mapping, got {type(cfg).__name__}")
    container.pop("hydra", None)
    missing = [key for key in TOP_KEYS if key not in container]
    if missing:
        raise ConfigError(f"config is missing section(s) {missing}; "
                          f"required: {', '.join(TOP_KEYS)}")
    return container


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _check_keys(section: Mapping[str, Any], known: tuple[str, ...] | list[str], where: str) -> None:
    unknown = sorted(set(section) - set(known))
    if unknown:
        prefix = "" if where == "config" else f"{where}."
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys in {where}: "
            f"{', '.join(sorted(known))}"
        )


def _check_section(section: dict[str, Any], rules: dict[str, Rule], prefix: str,
                   partial: bool = False) -> None:
    where = prefix.rstrip(".") or "config"
    if not partial:
        _check_keys(section, list(rules), where)
        missing = [key for key in rules if key not in section]
        if missing:
            raise ConfigError(f"{where} is missing key(s) {missing}")
    for key, rule in rules.items():
        if key in section:
            _check_value(f"{prefix}{key}", section[key], rule)


def _check_value(name: str, value: Any, rule: Rule) -> None:
    if value is None:
        if rule.nullable:
            return
        raise ConfigError(f"{name}=null is not allowed; expected {rule.allowed}")
    bad_type = not isinstance(value, rule.types) or (isinstance(value, bool) and bool not in
                                                     rule.types)
    if bad_type or not rule.check(value):
        raise ConfigError(f"{name}={value!r} is invalid; expected {rule.allowed}")


def _check_device(name: str) -> None:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available here; use auto or cpu")


def _build_task(task_cfg: Any) -> Any:
    from experiments.tasks import TASKS, build_task

    if not isinstance(task_cfg, dict) or "name" not in task_cfg:
        raise ConfigError(f"task must be a mapping with a 'name' (one of {', '.join(TASKS)}), "
                          f"got {task_cfg!r}")
    params = {k: v for k, v in task_cfg.items() if k != "name"}
    try:
        task = build_task(task_cfg["name"], **params)
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"task: {_message(err)}") from None
    if task.seq_len > MAX_SEQ_LEN:
        given = ", ".join(f"task.{k}={v!r}" for k, v in params.items() if "len" in k)
        raise ConfigError(f"task: {given or task_cfg['name']} makes sequences of {task.seq_len} "
                          f"tokens (hard split included); at most {MAX_SEQ_LEN} are allowed")
    return task


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return str(text).splitlines()[0] if str(text) else type(err).__name__


def _check_models(plain: dict[str, Any], task: Any) -> dict[str, dict[str, Any]]:
    from models.config import ModelConfig

    sections = plain["study"]["models"] or {plain["model"].get("arch", "?"): plain["model"]}
    models = {}
    for key, section in sections.items():
        where = "model" if not plain["study"]["models"] else f"study.models.{key}"
        if not isinstance(section, dict):
            raise ConfigError(f"{where} must be a mapping of ModelConfig fields, got {section!r}")
        if section.get("arch") in HF_ARCHS:
            models[key] = _check_hf_model(where, section, task)
            continue
        for name in TASK_MODEL_FIELDS:
            if name in section:
                raise ConfigError(f"{where}.{name} is set from the task ({task.name}); remove it")
        fields = {"halt_token_id": task.halt_token_id, **section,
                  "vocab_size": task.vocab_size, "max_seq_len": task.seq_len}
        window = fields.get("window", 1)
        if isinstance(window, int) and window > task.seq_len:
            raise ConfigError(
                f"{where}.window={window} exceeds the task's sequence length "
                f"{task.seq_len}; choose 1..{task.seq_len}"
            )
        try:
            ModelConfig.from_dict(fields)
        except (KeyError, ValueError, TypeError) as err:
            raise ConfigError(f"{where}: {_message(err)}") from None
        models[key] = fields
    return models


HF_ARCHS = ("hf", "hf_retrofit")
# keys of a Hugging Face model section: from_pretrained's arguments plus the study's own two
HF_KEYS = ("arch", "path", "loop_layers", "injection", "attn_implementation", "trainable",
           "finetune")
AS_LOADED = "as_loaded"  # the model field saying the study does not train it (finetune=false)


def _check_hf_model(where: str, section: dict[str, Any], task: Any) -> dict[str, Any]:
    """A local Hugging Face checkpoint section: every key, the directory (no weight loaded), the
    layer range, and the task's fit (its token ids and sequence length). Returns the fields the
    study builds it from (``models.build_model``), plus ``as_loaded`` (native loop count) when
    ``finetune`` is false."""
    from pathlib import Path

    unknown = sorted(set(section) - set(HF_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} does not apply to a Hugging Face checkpoint (its "
                          f"sizes come from its config.json); remove it (~{where}.{unknown[0]}); "
                          f"valid keys: {', '.join(HF_KEYS)}")
    path = section.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}.path={path!r} is invalid; expected a local Hugging Face "
                          "checkpoint directory")
    finetune = section.get("finetune", True)
    _check_value(f"{where}.finetune", finetune, BOOL)
    try:
        from models.hf import TRAINABLE, inspect_checkpoint

        trainable = section.get("trainable", "all")
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
        hf_config, settings = inspect_checkpoint(path, section.get("loop_layers"),
                                                 section.get("injection"),
                                                 attn_implementation=section.get(
                                                     "attn_implementation"))
    except (ImportError, ValueError, OSError) as err:
        raise ConfigError(f"{where}: {_message(err)}") from None
    vocab = int(hf_config.vocab_size)
    if task.vocab_size > vocab:
        raise ConfigError(f"{where}: task {task.name} uses token ids 0..{task.vocab_size - 1} "
                          f"(task vocab_size={task.vocab_size}), more than the checkpoint's "
                          f"vocab_size={vocab}; choose a task with a smaller vocabulary or "
                          "another checkpoint")
    positions = int(hf_config.max_position_embeddings)
    if task.seq_len > positions:
        raise ConfigError(f"{where}: task {task.name} makes sequences of {task.seq_len} tokens "
                          f"(hard split included), more than the checkpoint's "
                          f"max_position_embeddings={positions}; shorten the task's lengths")
    loop_layers = settings["loop_layers"]
    fields = {"arch": section.get("arch", "hf_retrofit"), "path": str(Path(path).resolve()),
              "loop_layers": None if loop_layers is None else list(loop_layers),
              "injection": settings["injection"],
              "attn_implementation": settings["attn_implementation"], "trainable": trainable}
    if not finetune:  # one loop is the checkpoint itself (retrofit); HRM runs its H-cycles
        fields[AS_LOADED] = int(getattr(hf_config, "H_cycles", 1)) if loop_layers is None else 1
    return fields


def needs_training(controller: Any) -> bool:
    """Whether a controller has a training objective of its own (a learned halting head)."""
    from halting.base import LoopController

    return type(controller).loss_terms is not LoopController.loss_terms


def _check_as_loaded(plain: dict[str, Any], models: dict[str, dict[str, Any]]) -> None:
    """A model evaluated as loaded has an untrained halting head: no evaluation controller may
    read one."""
    from halting import build_controller

    if not any(AS_LOADED in fields for fields in models.values()):
        return
    for name, section in plain["eval"]["controllers"].items():
        if needs_training(build_controller(dict(section))):
            raise ConfigError(f"eval.controllers.{name} ({section['name']}) needs a trained "
                              "halting head, but model.finetune=false evaluates the checkpoint as "
                              f"loaded; remove it (~eval.controllers.{name}) or fine-tune")


def controller_sections(plain: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """Every controller config in the run as ``(where, config, role)``; role: train or eval."""
    found = [("controller", plain["controller"], "train")]
    found += [(f"study.learned.{k}", v, "train") for k, v in plain["study"]["learned"].items()]
    found += [(f"eval.controllers.{k}", v, "eval") for k, v in plain["eval"]["controllers"].items()]
    return found


def _check_controllers(plain: dict[str, Any], models: dict[str, dict[str, Any]]) -> None:
    from halting import build_controller

    study, evaluation, train = plain["study"], plain["eval"], plain["train"]
    if plain["controller"].get("name") == "fixed" and not study["train_loops"]:
        loops = plain["controller"].get("loops")
        _check_value("controller.loops", loops, _int(1))
    for where, section, role in controller_sections(plain):
        if not isinstance(section, dict) or "name" not in section:
            raise ConfigError(f"{where} must be a mapping with a controller 'name', "
                              f"got {section!r}")
        try:
            controller = build_controller(dict(section))
        except (KeyError, ValueError, TypeError) as err:
            raise ConfigError(f"{where}: {_message(err)}") from None
        granularity = train["granularity"] if role == "train" else evaluation["granularity"]
        if granularity not in controller.granularities:
            raise ConfigError(
                f"{role}.granularity={granularity} is not supported by {where} "
                f"({section['name']}); it supports: {', '.join(controller.granularities)}"
            )
        budgets = evaluation["budgets"] if role == "eval" else [study["max_loops"]]
        low = controller.min_loops()
        if any(budget < low for budget in budgets):
            raise ConfigError(
                f"max_loops {min(budgets)} < min_loops {low} of {where}; raise the budget "
                f"({'eval.budgets' if role == 'eval' else 'study.max_loops'}) or lower min_loops"
            )
        if section["name"] == "halt_token" and section.get("token_id") is None:
            for key, fields in models.items():
                if fields.get("halt_token_id") is None:
                    raise ConfigError(
                        f"{where} (halt_token) needs a halt token, but model {key!r} has "
                        "halt_token_id=null; set model.halt_token_id or choose another controller"
                    )
