"""DPO and its kin on packed preference pairs: an objective (train/objectives.py) whose units are pairs.

A window of preference shards holds whole pairs, documents 2k and 2k + 1 of a row being pair k's chosen and
rejected sides (data/packing.py), so every pair is whole in one micro-batch and its loss is computed on the
last pipeline stage like any other. Per document d, over its targets (the reply's tokens):

    logp(d) = Σ_t log p(label_t)                the policy's, from this forward pass
    ref(d)                                      the reference's: batch["reference"], in the same columns
    c = logp(2k) - ref(2k),  r = logp(2k+1) - ref(2k+1),  Δ = c - r

    sigmoid  -log σ(β Δ)                                        DPO (Rafailov et al. 2023)
    hinge    max(0, 1 - β Δ)                                    SLiC (Zhao et al. 2023)
    ipo      (c / n_c - r / n_r - 1 / 2β)²                      IPO (Azar et al. 2023), on per-token log-ratios
                                                                (n: the side's targets), as TRL normalises it
    robust   (-(1 - ε) log σ(β Δ) + ε log σ(-β Δ)) / (1 - 2ε)   conservative DPO under label noise ε
                                                                (Chowdhury et al. 2024)
    + w · (-logp(2k) / n_c)                                     with sft_weight w: the chosen reply's mean
                                                                cross entropy, per pair (RPO, Pang et al. 2024)

The engine divides the sum over pairs by the pairs of the global batch. Metrics, per pair: the reward
accuracy (β c > β r), the reward margin β Δ, the chosen and rejected rewards β c and β r, the policy's
log-probs of each side, and whether the policy finds the chosen reply the likelier (logp(2k) > logp(2k+1)).

The reference is the model with its LoRA adapters off (`reference_pass`: the engine fills
batch["reference"] from a forward pass of its own before the step) or, for full finetuning, log-probs
scored once by train.init_from and read beside the shards (data/reference.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalelm.config import DPOConfig
from scalelm.train.pairs import document_logps, pair_sizes, pairs_of


class DPO:
    """finetune.objective=dpo: one of DPO's losses over the micro-batch's pairs (see the module docstring)."""

    fields = ("labels", "loss_mask", "document_ids", "reference")
    metrics = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected",
               "chosen_likelier")
    unit = "pairs"

    def __init__(self, dpo: DPOConfig, reference_pass: bool):
        self.dpo = dpo
        self.reference_pass = reference_pass  # the reference is this model with its adapters off (LoRA)

    def units(self, batch: dict) -> int:
        chosen, rejected = pair_sizes(batch)
        return int(((chosen > 0) & (rejected > 0)).sum())

    def document_logps(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return document_logps(logits, batch)

    def __call__(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n_chosen, n_rejected = pair_sizes(batch)
        real = (n_chosen > 0) & (n_rejected > 0)  # (b, L/2): the slots that hold a pair
        logp_chosen, logp_rejected = pairs_of(document_logps(logits, batch))
        ref_chosen, ref_rejected = pairs_of(batch["reference"].to(logp_chosen.dtype))
        chosen, rejected = logp_chosen - ref_chosen, logp_rejected - ref_rejected  # log-ratios
        losses = self._loss(chosen, rejected, n_chosen.clamp(min=1), n_rejected.clamp(min=1))
        if self.dpo.sft_weight:
            losses = losses - self.dpo.sft_weight * logp_chosen / n_chosen.clamp(min=1)
        beta = self.dpo.beta
        with torch.no_grad():
            rewards_chosen, rewards_rejected = beta * chosen.detach(), beta * rejected.detach()
            metrics = {"reward_accuracy": (rewards_chosen > rewards_rejected), "reward_margin": rewards_chosen - rewards_rejected,
                       "reward_chosen": rewards_chosen, "reward_rejected": rewards_rejected,
                       "logps_chosen": logp_chosen.detach(), "logps_rejected": logp_rejected.detach(),
                       "chosen_likelier": logp_chosen.detach() > logp_rejected.detach()}
            metrics = {k: torch.where(real, v.float(), 0.0).sum() for k, v in metrics.items()}
        return torch.where(real, losses, 0.0).sum(), metrics

    def _loss(self, chosen: torch.Tensor, rejected: torch.Tensor, n_chosen: torch.Tensor,
              n_rejected: torch.Tensor) -> torch.Tensor:
        beta, kind, eps = self.dpo.beta, self.dpo.loss, self.dpo.label_smoothing
        delta = beta * (chosen - rejected)
        if kind == "sigmoid":
            return -F.logsigmoid(delta)
        if kind == "hinge":
            return torch.relu(1 - delta)
        if kind == "ipo":
            return (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
        if kind == "robust":
            return (-(1 - eps) * F.logsigmoid(delta) + eps * F.logsigmoid(-delta)) / (1 - 2 * eps)
        raise ValueError(f"finetune.dpo.loss={kind!r}: use sigmoid, ipo, hinge or robust")


class Likelihoods(DPO):
    """A model on preference pairs without a reference (one not trained with DPO, in `scalelm eval`): DPO's figures
    against a reference of zeros, so that its rewards are β logp and what counts is `chosen_likelier`."""

    fields = tuple(f for f in DPO.fields if f != "reference")

    def __init__(self, dpo: DPOConfig):
        super().__init__(dpo, reference_pass=False)

    def __call__(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return super().__call__(logits, {**batch, "reference": torch.zeros_like(batch["loss_mask"], dtype=torch.float32)})
