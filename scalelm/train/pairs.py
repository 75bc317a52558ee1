"""Per-document sums on packed windows, and the pairs of preference windows: document d's value sits in column d
of a (b, L) tensor (its id, data/packing.py), and pair k is documents 2k (chosen) and 2k + 1 (rejected)."""

from __future__ import annotations

import torch

from scalelm.train.objectives import token_losses


def document_sums(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """(b, L) per-token `values` summed per document: column d holds document d's sum over its targets."""
    mask = batch["loss_mask"].to(values.dtype)
    return torch.zeros_like(values).scatter_add_(1, batch["document_ids"], values * mask)


def document_logps(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """(b, L) float32: each document's Σ log p of its target labels, in the column of its id; logits (s, b, V/tp)
    split over tensor ranks, consumed (see token_losses)."""
    return document_sums(-token_losses(logits, batch["labels"]).t(), batch)


def pairs_of(per_document: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, L) per-document values -> (chosen, rejected), each (b, L // 2): pair k's at column k."""
    b, length = per_document.shape
    sides = per_document[:, : length // 2 * 2].reshape(b, length // 2, 2)
    return sides[..., 0], sides[..., 1]


def pair_sizes(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) target counts of each pair slot, (b, L // 2) each; a slot past a row's pairs has zeros."""
    ones = torch.ones(batch["loss_mask"].shape, dtype=torch.float32, device=batch["loss_mask"].device)
    return pairs_of(document_sums(ones, batch))
