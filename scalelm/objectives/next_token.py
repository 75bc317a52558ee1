"""next_token (train.objective, the default) and sft (finetune.objective, the default): cross entropy of the next
token over the batch's targets.

    loss = Σ_targets -log p(label_t | tokens before t)          metric: accuracy, the share of targets whose most
                                                                likely next token is the label
next_token trains on text shards, every token a target (or, with data.document_mask, every token of its own
document); sft on chat shards, the targets those of finetune.train_on (a loss_mask: the assistant turns and their
<|end|>, every token, or the last assistant turn). Either measures any language model in `scalelm eval` as
perplexity, exp of the mean loss.
"""

from __future__ import annotations

import math

import torch

from scalelm.errors import ConfigError
from scalelm.objectives.base import FIELDS, Defaults, EvalContext, Output
from scalelm.objectives.registry import register
from scalelm.objectives.reports import Perplexity
from scalelm.objectives.tokens import token_hits, token_losses


@register
class NextToken(Defaults):
    name, stage, data, output = "next_token", "pretrain", "text", Output.LOGITS
    unit, fields, metrics = "targets", ("labels", "loss_mask"), ("accuracy",)
    any_language_model = True

    @classmethod
    def check(cls, cfg) -> None:
        if not cfg.model.causal:
            raise ConfigError(f"{FIELDS[cls.stage]}={cls.name} predicts each next token, and model.causal=false lets "
                              f"every token see the ones after it: set model.causal=true")

    def units(self, batch: dict) -> int:
        mask = batch.get("loss_mask")
        return batch["labels"].numel() if mask is None else int(mask.sum())

    def __call__(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hits = token_hits(logits, batch["labels"])  # first: the loss consumes the logits
        losses = token_losses(logits, batch["labels"])  # (s, b)
        mask = batch.get("loss_mask")
        if mask is not None:
            losses, hits = losses * mask.t(), hits & mask.t()
        return losses.sum(), {"accuracy": hits.sum()}

    def validation(self, loss: float, metrics: dict[str, float]) -> tuple[dict[str, float], str]:
        accuracy, perplexity = metrics.get("accuracy"), math.exp(min(loss, 50.0))
        line = (f"val loss {loss:.4f}, perplexity {perplexity:.2f}"
                + (f", next-token accuracy {100 * accuracy:.1f}%" if accuracy is not None else ""))
        return {"val_loss": loss, "val_perplexity": perplexity, "val_accuracy": accuracy}, line

    def evaluate(self, engine, batches: list[dict], count: int, context: EvalContext) -> Perplexity | None:
        outcome = engine.evaluate(batches, count)
        return Perplexity(outcome.loss, context.windows, context.seq_len, context.engine,
                          outcome.units if context.documents else None, outcome.metrics["accuracy"]) if context.rank0 else None


@register
class SFT(NextToken):
    name, stage, data = "sft", "finetune", "chat"
