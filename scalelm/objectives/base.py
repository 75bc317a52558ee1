"""What an objective is: the contract the engine, the loop, the data checks and the evaluation rely on.

An objective maps what the model computes for a micro-batch to a loss summed over its units (target tokens, pairs,
texts) and to metric sums over the same units. The engine (parallel/engine.py) knows every micro-batch of a step
before the first forward pass, so it divides by the units of the whole global batch:

    loss = Σ_{micro-batches, ranks} loss_sum / Σ_{micro-batches, ranks} units

which is token-weighted (or pair-weighted), not a mean of per-micro-batch means; metric sums are divided by the same
count. An objective reads only its `fields` of a batch, which is all the last pipeline stage is handed of it.

What it declares, so that nothing else needs its name:
  name, stage     the config names it: train.objective (stage pretrain, `scalelm pretrain`) or finetune.objective
                  (stage finetune, `scalelm finetune`)
  data            the kind of shards it trains on (scalelm.data.shards.KINDS): text, chat, pairs or labels
  head            what the model ends in: "lm" (next-token logits) or "classification" (finetune.num_labels scores)
  causal          whether it needs a causal model (model.causal); a bidirectional one sees the tokens it predicts
  output          what it needs from the model, which the engine computes (Output)
  reference       whether each batch must carry a reference's log-probs (batch["reference"], by document)
  samples         whether it trains on the model's own completions (RL: its batches come from rollouts)
  unit, fields, metrics   what its loss is a mean over, the batch fields it reads, its metric sums
and it checks its own part of the config (`check`), and says how its figures read in the log and in `scalelm eval`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch

from scalelm.batch import Batch

Stage = Literal["pretrain", "finetune"]
FIELDS: dict[str, str] = {"pretrain": "train.objective", "finetune": "finetune.objective"}  # stage -> config field


class Output(enum.Enum):
    """What a forward pass hands on (engine.forward_only, and an objective's `output`)."""

    LOGITS = "logits"  # (s, b, V/tp) the language-model head's logits, this tensor rank's slice of the vocabulary
    LOGPROBS = "logprobs"  # (b, s) float32: log p(label) at every position, whole on every rank (needs "labels")
    SCORES = "scores"  # (s, b, n) a classification head's scores at every position
    HIDDEN = "hidden"  # (s, b, h) the final norm's output, before any head


@dataclass
class EvalContext:
    """What an evaluation pass is over, for its report: `windows` windows of `seq_len` tokens of `split`, run by
    `engine` (its layout and precision, in words); `documents`: the windows pack documents (chat shards), whose
    targets are counted; `labels`: the names of a classifier's classes; `rank0`: this rank reports."""

    split: str
    windows: int
    seq_len: int
    engine: str
    documents: bool
    rank0: bool
    labels: list[str] | None = None


class Objective(Protocol):
    """The contract (see the module docstring)."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    data: ClassVar[str]
    head: ClassVar[str]
    causal: ClassVar[bool]
    output: ClassVar[Output]
    reference: ClassVar[bool]
    samples: ClassVar[bool]
    unit: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]
    metrics: ClassVar[tuple[str, ...]]
    trains: ClassVar[bool]  # a config may name it (false: it only measures, in `scalelm eval`)
    any_language_model: ClassVar[bool]  # `scalelm eval` measures any language model on its data with it

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ConfigError (naming the field, the value and the fix) if the config does not suit it."""

    @classmethod
    def check_data(cls, cfg, shards) -> None:
        """Raise DataError if a training source (a ShardSet of its kind) does not suit the config."""

    def num_labels(self) -> int | None:
        """The classification head's outputs (head "classification"), else None."""

    def units(self, batch: Batch) -> int:
        """The micro-batch's units, from the batch alone."""

    def __call__(self, output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the micro-batch's units, {metric: sum over them})."""

    def progress(self, metrics: dict[str, float]) -> str:
        """What the progress line adds to the loss for a training step ("" for nothing)."""

    def validation(self, loss: float, metrics: dict[str, float]) -> tuple[dict[str, float], str]:
        """A validation's record for metrics.jsonl (val_* keys) and its line for the log."""

    def evaluate(self, engine: Any, batches: list[Batch], count: int, context: EvalContext) -> Any:
        """`scalelm eval`'s figures over `count` micro-batches per data-parallel rank (`batches`: this rank's, [] on
        a rank that reads none), as an object with `line(split)`, on rank 0 (None elsewhere); collective."""


class Defaults:
    """What most objectives declare alike: a language-model head on a causal model, no reference, a name a config may
    give, no rules of their own, no word in the progress line. An objective subclasses it and says what differs."""

    head, causal, reference, samples = "lm", True, False, False
    trains, any_language_model = True, False

    def __init__(self, cfg=None):
        pass

    @classmethod
    def check(cls, cfg) -> None:
        pass

    @classmethod
    def check_data(cls, cfg, shards) -> None:
        pass

    def num_labels(self) -> int | None:
        return None

    def progress(self, metrics: dict[str, float]) -> str:
        return ""
