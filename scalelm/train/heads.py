"""Objectives of a classification head (finetune.head=classification, model/gpt.py's ScoreHead): the model scores
every position, and a document's score is the one at its last token, as Hugging Face's *ForSequenceClassification
reads the last token that is not padding.

    classify, on labelled texts: z the text's scores (num_labels), c its class (batch["classes"], by document
        column); loss = cross entropy of softmax(z) against c per text; metric: accuracy (argmax z = c)
    reward (Bradley-Terry), on preference pairs: s_c, s_r the scores of pair k's chosen and rejected sides
        (documents 2k and 2k + 1 of a packed window, data/packing.py); loss = -log σ(s_c - s_r) per pair
        metrics per pair: accuracy (s_c > s_r), margin s_c - s_r, the chosen and rejected scores

The engine divides the sum over texts (pairs) by the texts (pairs) of the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalelm.train.pairs import pair_sizes, pairs_of


def last_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(b, L) document ids -> (b, L): column d holds the position of document d's last token (0 for ids absent)."""
    positions = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    return torch.zeros_like(document_ids).scatter_reduce_(1, document_ids, positions, "amax")


def document_scores(scores: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """scores (s, b, n) at every position -> (b, L, n): each document's, read at its last token, at its id's column."""
    b, length = document_ids.shape
    last = last_positions(document_ids)
    return scores.transpose(0, 1).float().gather(1, last[..., None].expand(b, length, scores.shape[-1]))


class Reward:
    """finetune.objective=reward: a reward model trained on preference pairs with the Bradley-Terry loss."""

    fields = ("loss_mask", "document_ids")
    metrics = ("accuracy", "margin", "score_chosen", "score_rejected")
    unit = "pairs"
    reference_pass = False

    def units(self, batch: dict) -> int:
        chosen, rejected = pair_sizes(batch)
        return int(((chosen > 0) & (rejected > 0)).sum())

    def __call__(self, scores: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n_chosen, n_rejected = pair_sizes(batch)
        real = (n_chosen > 0) & (n_rejected > 0)  # (b, L/2): the slots that hold a pair
        chosen, rejected = pairs_of(document_scores(scores, batch["document_ids"])[..., 0])
        losses = -F.logsigmoid(chosen - rejected)
        with torch.no_grad():
            metrics = {"accuracy": chosen > rejected, "margin": chosen - rejected, "score_chosen": chosen,
                       "score_rejected": rejected}
            metrics = {k: torch.where(real, v.float(), 0.0).sum() for k, v in metrics.items()}
        return torch.where(real, losses, 0.0).sum(), metrics


class Classify:
    """finetune.objective=classify: cross entropy of each labelled text's class."""

    fields = ("document_ids", "classes")
    metrics = ("accuracy",)
    unit = "texts"
    reference_pass = False

    def units(self, batch: dict) -> int:
        return int((batch["classes"] >= 0).sum())

    def predictions(self, scores: torch.Tensor, batch: dict) -> torch.Tensor:
        """(n, 2) int64: each text's predicted class and its class, for the evaluation's confusion matrix."""
        classes = batch["classes"]
        best = document_scores(scores, batch["document_ids"]).argmax(-1)
        real = classes >= 0
        return torch.stack([best[real], classes[real]], dim=1).cpu()

    def __call__(self, scores: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        classes = batch["classes"]  # (b, L): each document's class at its id's column, -1 past the last text
        logits = document_scores(scores, batch["document_ids"])  # (b, L, n)
        losses = F.cross_entropy(logits.flatten(0, 1), classes.flatten().clamp(min=0), reduction="none")
        real = classes.flatten() >= 0
        hits = (logits.detach().argmax(-1).flatten() == classes.flatten()) & real
        return torch.where(real, losses, 0.0).sum(), {"accuracy": hits.sum().float()}
