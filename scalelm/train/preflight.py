"""What a run can be refused for before any rank starts: the checks that need no model and no process group.

`preflight` runs in the process that launches the ranks (`scalelm pretrain|finetune`, the SLURM batch script, the
Ray driver), so that a bad config, shards that do not fit it, a tokenizer of another identity or a missing
checkpoint end in one line, not in as many lines as there are ranks and a launcher's traceback. Every rank runs it
again when it starts (cheap: manifests and hashes of small files), for ranks launched some other way.

    the config          every section (config/validate.py) against the world size, and the objective's own rules
    the data            each training source holds the kind of shards the objective trains on; the loaders open:
                        the tokenizer's identity, chat shards that fit train.seq_len, enough windows for the readers;
                        for RL the prompt shards' tokenizer and the rewards (rl.check: importable, a reward head)
    the checkpoints     train.init_from and a train.resume path exist and hold a checkpoint
"""

from __future__ import annotations

from pathlib import Path

import torch

from scalelm import objectives, rl
from scalelm.checkpoint import store
from scalelm.config import Config, validate
from scalelm.data.files import sha256_file
from scalelm.data.loader import loader_from_config
from scalelm.data.shards import KINDS, read_manifest
from scalelm.data.tokenizer import resolve_vocab_size
from scalelm.errors import CheckpointError, ConfigError, DataError
from scalelm.objectives import Objective, Stage
from scalelm.objectives.base import FIELDS


def preflight(cfg: Config, stage: Stage, world: int) -> Objective:
    """Check the run of `stage` on `world` ranks (see the module docstring); its objective. Raises a ScalelmError."""
    validate(cfg, world_size=world)  # layout errors surface before any process group starts
    objective = objectives.objective_for(cfg, stage)
    if cfg.finetune.lora and not cfg.train.init_from:
        raise ConfigError("finetune.lora adapts a trained model, and train.init_from is not set: set it to a checkpoint "
                          "or to `scalelm convert from-hf` output")
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed has no fp16 on the CPU): use bf16 or fp32 here")
    cfg.model.vocab_size = resolve_vocab_size(cfg)  # saved with checkpoints, resolved
    check_data(cfg, stage, objective)
    data = world // (cfg.parallel.tensor * cfg.parallel.pipeline)
    if objective.samples:  # RL: prompt shards, made with data.tokenizer (the rollouts read them whole); the rewards
        for source in cfg.data.train:
            read_manifest(source, "train", sha256_file(cfg.data.tokenizer))
        rl.check(cfg)
    else:
        loader_from_config(cfg, "train", 0, data)  # opening them checks the tokenizer, the shards' lengths and windows
    if cfg.train.eval_every:
        loader_from_config(cfg, "val", 0, data)
    for key, path in (("train.init_from", cfg.train.init_from),
                      ("train.resume", None if cfg.train.resume in ("auto", "none") else cfg.train.resume)):
        if path:
            try:
                store.read_manifest(store.resolve(Path(path)))
            except CheckpointError as e:
                raise CheckpointError(f"{key}={path}: {e}") from None
    return objective


def check_data(cfg: Config, stage: Stage, objective: Objective) -> None:
    """Each training source holds the kind of shards the objective trains on (and what the objective asks of them);
    a DataError naming the source and what to do otherwise."""
    for source in cfg.data.train:
        shards = read_manifest(source, "train")
        if shards.kind != objective.data:
            raise DataError(_mismatch(source, shards.kind, objective, stage))
        objective.check_data(cfg, shards)


def _mismatch(source: str, found: str, objective: Objective, stage: Stage) -> str:
    there, wanted, field = KINDS[found], KINDS[objective.data], FIELDS[stage]
    here = [cls for cls in objectives.trainers(found) if cls.stage == stage]
    if here:  # another objective of this command trains on them
        return (f"{source} holds {there.what}, and {field}={objective.name} trains on {wanted.what}: write them with "
                f"{wanted.command}, or train on them with " + " or ".join(f"{field}={cls.name}" for cls in here))
    if stage == "pretrain":
        return f"{source} holds {there.what} ({there.command}): finetune on them with `scalelm finetune`"
    return (f"{source} holds {there.what}, and {field}={objective.name} trains on {wanted.what} (write them with "
            f"{wanted.command})" + ("; to continue pretraining on them use `scalelm pretrain` with train.init_from"
                                   if found == "text" else ""))
