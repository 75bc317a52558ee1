"""`scalelm finetune`: chat SFT from a pretrained or Hugging Face model, through the same loop as pretraining.

What differs from `scalelm pretrain` is decided here, before any rank starts:
  - the data: chat shards (`scalelm shard --chat`), packed whole conversations, the loss on their
    targets only (finetune.train_on); pretraining refuses chat shards and finetuning text shards;
  - the start: train.init_from, a scalelm checkpoint of any layout or `scalelm convert from-hf`'s output;
    its model and tokenizer are the run's unless the config says otherwise, and a config whose model
    does not match the weights is refused when they load;
  - the objective: finetune.objective (train/objectives.py).
Everything else (layouts, launchers, checkpoints, resume, resharding, logs) is pretraining's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from scalelm.checkpoint import store
from scalelm.config import Config, load_config
from scalelm.data.shards import read_manifest
from scalelm.errors import CheckpointError, ConfigError, DataError


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
    return load_config(path, overrides, base=base)


def check_data(cfg: Config, stage: str) -> None:
    """Pretraining reads text shards, SFT chat shards, DPO and reward models preference shards, classifiers labelled
    texts; anything else is a DataError naming the source."""
    for source in cfg.data.train:
        shards = read_manifest(source, "train")
        chat = shards.chat is not None
        if stage == "finetune" and (cfg.finetune.objective == "classify") != (shards.labels is not None):
            raise DataError(f"{source} holds {'labelled texts' if shards.labels is not None else 'no labelled texts'}, "
                            f"and finetune.objective={cfg.finetune.objective}: classify trains on `scalelm shard "
                            f"--labels` shards, and only it does")
        if stage == "finetune" and shards.labels is not None and len(shards.labels) > cfg.finetune.num_labels:
            raise DataError(f"{source} holds {len(shards.labels)} classes ({', '.join(shards.labels[:6])}"
                            f"{', ...' if len(shards.labels) > 6 else ''}), more than finetune.num_labels="
                            f"{cfg.finetune.num_labels}: set finetune.num_labels={len(shards.labels)}")
        pairwise = cfg.finetune.objective in ("dpo", "reward")
        if stage == "finetune" and pairwise and not shards.pairs:
            raise DataError(f"{source} holds {'chat' if chat else 'text'} shards, and finetune.objective="
                            f"{cfg.finetune.objective} trains on preference pairs: write them with `scalelm shard --preference`")
        if stage == "finetune" and not pairwise and shards.pairs:
            raise DataError(f"{source} holds preference pairs (`scalelm shard --preference`): train on them with "
                            f"finetune.objective=dpo, or give SFT chat shards (`scalelm shard --chat`)")
        if stage == "pretrain" and chat:
            raise DataError(f"{source} holds chat shards (`scalelm shard --chat`): finetune on them with "
                            f"`scalelm finetune`")
        if stage == "finetune" and not chat:
            raise DataError(f"{source} holds text shards: `scalelm finetune` trains on conversations (write them with "
                            f"`scalelm shard --chat`); to continue pretraining use `scalelm pretrain` with train.init_from")
