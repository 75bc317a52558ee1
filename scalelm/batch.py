"""A micro-batch, as the loader makes it (data/loader.py), batch sources transform it (train/sources.py) and the engine
and objectives read it: B windows of L tokens, every field a (B, L) tensor but `origin`. Which fields a batch has
depends on its shards: text shards give input_ids and labels (and with data.document_mask the documents' positions
and ids), chat shards add the targets' mask, preference shards with scored references their log-probs, labelled
texts their classes."""

from __future__ import annotations

from typing import TypedDict

import torch


class Batch(TypedDict, total=False):
    input_ids: torch.Tensor  # int64 token ids
    labels: torch.Tensor  # int64: the next token of each position
    loss_mask: torch.Tensor  # bool: the labels that are targets (chat shards' finetune.train_on)
    position_ids: torch.Tensor  # int64: positions restarting at 0 with each packed document
    document_ids: torch.Tensor  # int64: each token's document within its window (0, 1, ...)
    reference: torch.Tensor  # float32: a reference's Σ log p of document d at column d (DPO)
    classes: torch.Tensor  # int64: labelled text d's class at column d, -1 past the last text
    origin: list[str]  # where each window starts, SHARD@TOKEN_OFFSET
