"""`scalelm finetune`'s config: a run that starts from a model, through the same loop as pretraining.

What differs from `scalelm pretrain` is the objective (finetune.objective, scalelm/objectives: SFT on chat
shards, DPO and reward models on preference pairs, classifiers on labelled texts), the data its objective trains
on (train/preflight.py), and the start: train.init_from, a scalelm checkpoint of any layout or `scalelm convert
from-hf`'s output, whose model and tokenizer are the run's unless the config says otherwise (a config whose model
does not match the weights is refused when they load). Everything else (layouts, launchers, checkpoints, resume,
resharding, logs) is pretraining's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from scalelm import objectives
from scalelm.checkpoint import store
from scalelm.config import Config, load_config
from scalelm.errors import CheckpointError, ConfigError


def load_finetune_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """The config at `path` with `overrides`, its model and tokenizer defaulting to train.init_from's."""
    cfg = load_config(path, overrides, check=False)  # validated below, with the start's model
    if not cfg.train.init_from:
        raise ConfigError("scalelm finetune starts from a model: set train.init_from to a checkpoint (any layout) "
                          "or to the output of `scalelm convert from-hf`")
    try:
        ckpt = store.resolve(Path(cfg.train.init_from))
        saved = store.read_manifest(ckpt)["config"]
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from={cfg.train.init_from}: {e}") from None
    base = {"model": saved["model"]}
    if saved.get("data", {}).get("tokenizer"):
        base["data"] = {"tokenizer": saved["data"]["tokenizer"]}
    cfg = load_config(path, overrides, base=base)
    inherited = base.get("data", {}).get("tokenizer")
    if cfg.data.tokenizer == inherited and not Path(inherited).is_file():
        raise ConfigError(f"train.init_from's run named its tokenizer {inherited}, which is not found from {Path.cwd()}: "
                          f"give data.tokenizer=PATH (the .model that run trained with)")
    objectives.check(cfg, "finetune")
    return cfg
