"""classify (finetune.objective): a classification head of finetune.num_labels outputs, trained with cross entropy
on labelled texts (`scalelm shard --labels`). The model scores every position and a text's scores are those at its
last token.

    z the text's scores (num_labels), c its class (batch["classes"], by document column)
    loss = cross entropy of softmax(z) against c, per text        metric: accuracy (argmax z = c)

`scalelm eval` reports accuracy, macro-F1 and the confusion matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from scalelm.errors import ConfigError, DataError
from scalelm.objectives.base import Defaults, EvalContext, Output
from scalelm.objectives.documents import document_scores
from scalelm.objectives.registry import register
from scalelm.objectives.reports import Classification


@register
class Classify(Defaults):
    name, stage, data = "classify", "finetune", "labels"
    head, causal, output = "classification", False, Output.SCORES
    unit, fields, metrics = "texts", ("document_ids", "classes"), ("accuracy",)

    def __init__(self, cfg):
        self.labels = cfg.finetune.num_labels

    @classmethod
    def check(cls, cfg) -> None:
        f = cfg.finetune
        if f.head != cls.head or f.num_labels < 2:
            raise ConfigError(f"finetune.objective={cls.name} needs finetune.head=classification and finetune.num_labels "
                              f"of 2 or more, the classes (now head={f.head}, num_labels={f.num_labels})")

    @classmethod
    def check_data(cls, cfg, shards) -> None:
        """The shards' classes must fit the head."""
        if shards.labels is not None and len(shards.labels) > cfg.finetune.num_labels:
            raise DataError(f"{shards.source} holds {len(shards.labels)} classes ({', '.join(shards.labels[:6])}"
                            f"{', ...' if len(shards.labels) > 6 else ''}), more than finetune.num_labels="
                            f"{cfg.finetune.num_labels}: set finetune.num_labels={len(shards.labels)}")

    def num_labels(self) -> int | None:
        return self.labels

    def units(self, batch: dict) -> int:
        return int((batch["classes"] >= 0).sum())

    def __call__(self, scores: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        classes = batch["classes"]  # (b, L): each document's class at its id's column, -1 past the last text
        logits = document_scores(scores, batch["document_ids"])  # (b, L, n)
        losses = F.cross_entropy(logits.flatten(0, 1), classes.flatten().clamp(min=0), reduction="none")
        real = classes.flatten() >= 0
        hits = (logits.detach().argmax(-1).flatten() == classes.flatten()) & real
        return torch.where(real, losses, 0.0).sum(), {"accuracy": hits.sum().float()}

    def predictions(self, scores: torch.Tensor, batch: dict) -> torch.Tensor:
        """(n, 2) int64: each text's predicted class and its class, for the evaluation's confusion matrix."""
        classes = batch["classes"].to(scores.device)
        best = document_scores(scores, batch["document_ids"].to(scores.device)).argmax(-1)
        real = classes >= 0
        return torch.stack([best[real], classes[real]], dim=1).cpu()

    def validation(self, loss: float, metrics: dict[str, float]) -> tuple[dict[str, float], str]:
        return {"val_loss": loss, "val_accuracy": metrics["accuracy"]}, \
            f"val loss {loss:.4f}, accuracy {100 * metrics['accuracy']:.1f}%"

    def evaluate(self, engine, batches: list[dict], count: int, context: EvalContext) -> Classification | None:
        """The confusion matrix of every rank's predictions (each tensor rank computes the same: one is counted)."""
        names = context.labels or []
        names = names + [str(i) for i in range(len(names), self.labels)]  # classes the data lacks
        found = engine.forward_only(batches, count, Output.SCORES)
        confusion = torch.zeros(len(names), len(names), dtype=torch.int64)
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            for scores, batch in zip(found, batches):
                if scores is not None:
                    for predicted, cls in self.predictions(scores, batch).tolist():
                        confusion[int(cls), int(predicted)] += 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            confusion = confusion.to(engine.device)
            dist.all_reduce(confusion)
        return Classification(names, confusion.cpu().tolist(), context.windows, context.engine) if context.rank0 else None
