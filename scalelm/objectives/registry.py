"""Objectives by name: train.objective and finetune.objective name one, and this is the one place that looks it up.

Each objective module registers its class where it is defined (`@register`); scalelm/objectives/__init__.py
imports them all. Everything else asks the registry, or the objective itself, and never compares a name:

    objective_for(cfg, stage)            the run's objective (the stage's field), its config checked
    trainers(kind)                       the objectives that train on a kind of shards, for data errors
    for_evaluation(cfg, trained, kind)   what `scalelm eval` measures a model with on a kind of shards
    generates(trained)                   whether text can be sampled from a model trained with it
"""

from __future__ import annotations

import difflib

from scalelm.data.shards import KINDS
from scalelm.errors import ConfigError
from scalelm.objectives.base import FIELDS, Objective, Stage

_BY_NAME: dict[str, type] = {}  # filled by @register as each objective module is imported


def register(cls: type) -> type:
    """Class decorator: make `cls` (an Objective) known by its `name`."""
    if cls.name in _BY_NAME:
        raise RuntimeError(f"two objectives are named {cls.name!r}: {_BY_NAME[cls.name].__module__} and {cls.__module__}")
    _BY_NAME[cls.name] = cls
    return cls


def configured(cfg, stage: Stage) -> str:
    """The objective the stage's config field names."""
    return cfg.train.objective if stage == "pretrain" else cfg.finetune.objective


def lookup(name: str, field: str) -> type:
    """The class of a trainable objective, or a ConfigError naming the ones there are."""
    known = sorted(n for n, cls in _BY_NAME.items() if cls.trains)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        raise ConfigError(f"{field}={name!r} is no objective: " + (f"did you mean {close[0]}?" if close else
                                                                   f"use one of {', '.join(known)}"))
    return _BY_NAME[name]


def check(cfg, stage: Stage) -> type:
    """The class of the stage's objective, once the config suits it; ConfigError naming the field and the fix."""
    field = FIELDS[stage]
    cls = lookup(configured(cfg, stage), field)
    if cls.stage != stage:
        raise ConfigError(f"{field}={cls.name} is a {cls.stage} objective: set {FIELDS[cls.stage]}={cls.name} and run "
                          f"`scalelm {cls.stage}`")
    cls.check(cfg)
    if stage == "finetune" and cfg.finetune.head != cls.head:
        heads = [c for c in _registered() if c.trains and c.head == cfg.finetune.head]
        raise ConfigError(f"finetune.head={cfg.finetune.head} trains with " + " or ".join(
            f"finetune.objective={c.name} ({KINDS[c.data].what})" for c in heads) + f", not {cls.name}")
    return cls


def objective_for(cfg, stage: Stage) -> Objective:
    """The objective of a run of `stage` (pretrain: train.objective, finetune: finetune.objective), checked."""
    return check(cfg, stage)(cfg)


def trainers(kind: str) -> list[type]:
    """The objectives that train on shards of `kind`, by name."""
    return [cls for cls in _registered() if cls.trains and cls.data == kind]


def for_evaluation(cfg, trained: str, shards, reference: bool, what: str) -> Objective:
    """What a model trained with the objective `trained` (and cfg, its config) is measured with on `shards` (a
    ShardSet): its own objective when it trains on their kind (one that needs a reference and has none, `reference`
    False: the figures of a model without one), else the objective that measures any language model on that kind.
    A ConfigError for a model that cannot be measured there; `what` names the model."""
    kind = shards.kind
    own = _BY_NAME[trained]
    if own.data == kind and (reference or not own.reference):
        return own(cfg)
    if own.head != "lm" and own.data != kind:
        raise ConfigError(f"{what} is a classification model ({own.name}): evaluate it on {KINDS[own.data].what} "
                          f"({KINDS[own.data].command})")
    against = [cls for cls in trainers(kind) if cls.reference and cls.head == own.head]
    if reference and against:  # a language model with a reference to compare with (its base, for LoRA): DPO's figures
        return against[0](cfg)
    measures = [cls for cls in _registered() if cls.any_language_model and cls.data == kind]
    if not measures:
        named = " or ".join(f"finetune.objective={cls.name}" for cls in trainers(kind))
        raise ConfigError(f"{shards.source} holds {KINDS[kind].what}, and {what} has no classification head: evaluate "
                          f"a model trained with {named} on them")
    if measures[0].causal and not cfg.model.causal:
        raise ConfigError(f"{what} is a bidirectional model (model.causal=false), and {KINDS[kind].what} are measured by "
                          f"how well a model predicts each next token ({measures[0].name}), which it sees")
    return measures[0](cfg)


def generates(trained: str) -> bool:
    """Whether a model trained with the objective `trained` ends in next-token logits, which text is sampled from."""
    cls = _BY_NAME[trained]
    return cls.head == "lm" and cls.causal


def _registered() -> list[type]:
    return [_BY_NAME[name] for name in sorted(_BY_NAME)]
