"""reward (finetune.objective): a reward model, a classification head with one output, trained Bradley-Terry on
preference pairs. The model scores every position and a document's score is the one at its last token (as Hugging
Face's *ForSequenceClassification reads the last token that is not padding).

    s_c, s_r = the scores of pair k's chosen and rejected sides (documents 2k and 2k + 1 of a packed window)
    loss = -log σ(s_c - s_r) per pair          metrics per pair: accuracy (s_c > s_r), margin s_c - s_r, the scores
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalelm.errors import ConfigError
from scalelm.objectives.base import Defaults, EvalContext, Output
from scalelm.objectives.documents import document_scores, pairs_of, real_pairs
from scalelm.objectives.registry import register
from scalelm.objectives.reports import Preferences


@register
class Reward(Defaults):
    name, stage, data = "reward", "finetune", "pairs"
    head, causal, output = "classification", False, Output.SCORES
    unit, fields, metrics = "pairs", ("loss_mask", "document_ids"), ("accuracy", "margin", "score_chosen", "score_rejected")

    @classmethod
    def check(cls, cfg) -> None:
        f = cfg.finetune
        if f.train_on == "all":
            raise ConfigError(f"finetune.train_on=all would count the prompt in each reply's log-prob, and "
                              f"finetune.objective={cls.name} compares replies: use assistant (the default)")
        if f.head != cls.head or f.num_labels != 1:
            raise ConfigError(f"finetune.objective={cls.name} scores each reply with one number: set "
                              f"finetune.head=classification and finetune.num_labels=1 (now head={f.head}, "
                              f"num_labels={f.num_labels})")

    def num_labels(self) -> int | None:
        return 1

    def units(self, batch: dict) -> int:
        return int(real_pairs(batch).sum())

    def __call__(self, scores: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real = real_pairs(batch)  # (b, L/2): the slots that hold a pair
        chosen, rejected = pairs_of(document_scores(scores, batch["document_ids"])[..., 0])
        losses = -F.logsigmoid(chosen - rejected)
        with torch.no_grad():
            metrics = {"accuracy": chosen > rejected, "margin": chosen - rejected, "score_chosen": chosen,
                       "score_rejected": rejected}
            metrics = {k: torch.where(real, v.float(), 0.0).sum() for k, v in metrics.items()}
        return torch.where(real, losses, 0.0).sum(), metrics

    def validation(self, loss: float, metrics: dict[str, float]) -> tuple[dict[str, float], str]:
        record = {"val_loss": loss, "val_accuracy": metrics["accuracy"], "val_margin": metrics["margin"]}
        return record, f"val loss {loss:.4f}, accuracy {100 * metrics['accuracy']:.1f}%, margin {metrics['margin']:.3f}"

    def evaluate(self, engine, batches: list[dict], count: int, context: EvalContext) -> Preferences | None:
        outcome = engine.evaluate(batches, count)
        return Preferences.of(outcome, context, "scores")
