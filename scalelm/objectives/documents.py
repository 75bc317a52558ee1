"""Per-document values of packed windows, and the pairs of preference windows.

A window packs several documents (data/packing.py); document d's value sits in column d of a (b, L) tensor (its
id), and in preference windows pair k is documents 2k (the chosen reply) and 2k + 1 (the rejected one).
"""

from __future__ import annotations

import torch


def document_sums(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """(b, L) per-token `values` summed per document: column d holds document d's sum over its targets."""
    mask = batch["loss_mask"].to(values.dtype)
    return torch.zeros_like(values).scatter_add_(1, batch["document_ids"], values * mask)


def document_logps(logps: torch.Tensor, batch: dict) -> torch.Tensor:
    """(b, L) float32: each document's Σ log p over its targets, in the column of its id, from the per-token log-probs
    (b, s) the engine hands on (Output.LOGPROBS); the batch's fields are read where the log-probs are."""
    return document_sums(logps, {k: batch[k].to(logps.device) for k in ("loss_mask", "document_ids")})


def pairs_of(per_document: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, L) per-document values -> (chosen, rejected), each (b, L // 2): pair k's at column k."""
    b, length = per_document.shape
    sides = per_document[:, : length // 2 * 2].reshape(b, length // 2, 2)
    return sides[..., 0], sides[..., 1]


def pair_sizes(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) target counts of each pair slot, (b, L // 2) each; a slot past a row's pairs has zeros."""
    ones = torch.ones(batch["loss_mask"].shape, dtype=torch.float32, device=batch["loss_mask"].device)
    return pairs_of(document_sums(ones, batch))


def real_pairs(batch: dict) -> torch.Tensor:
    """(b, L // 2) bool: the pair slots that hold a pair (both sides have targets)."""
    chosen, rejected = pair_sizes(batch)
    return (chosen > 0) & (rejected > 0)


def last_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(b, L) document ids -> (b, L): column d holds the position of document d's last token (0 for ids absent)."""
    positions = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    return torch.zeros_like(document_ids).scatter_reduce_(1, document_ids, positions, "amax")


def document_scores(scores: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """scores (s, b, n) at every position -> (b, L, n): each document's, read at its last token, at its id's column."""
    b, length = document_ids.shape
    last = last_positions(document_ids)
    return scores.transpose(0, 1).float().gather(1, last[..., None].expand(b, length, scores.shape[-1]))
