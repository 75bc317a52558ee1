"""dpo (finetune.objective): DPO and its kin on packed preference pairs, whose units are pairs.

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

It needs a reference (`reference`): the run's batch source supplies batch["reference"], the model with its LoRA
adapters off (train/sources.py) or, for full finetuning, log-probs scored once by train.init_from and read beside
the shards (data/reference.py). `likelihoods` is the same figures against a reference of zeros: how `scalelm eval`
measures a model on preference pairs that was not trained with DPO (what counts then is `chosen_likelier`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalelm.errors import ConfigError
from scalelm.objectives.base import Defaults, EvalContext, Output
from scalelm.objectives.documents import document_sums, pair_sizes, pairs_of, real_pairs
from scalelm.objectives.registry import register
from scalelm.objectives.reports import Preferences


@register
class DPO(Defaults):
    name, stage, data, output, reference = "dpo", "finetune", "pairs", Output.LOGPROBS, True
    unit = "pairs"
    fields = ("labels", "loss_mask", "document_ids", "reference")
    metrics = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected",
               "chosen_likelier")
    figures = "rewards"  # what `scalelm eval` reports (objectives/reports.py: Preferences)

    def __init__(self, cfg):
        self.dpo = cfg.finetune.dpo

    @classmethod
    def check(cls, cfg) -> None:
        f, dpo = cfg.finetune, cfg.finetune.dpo
        if not cfg.model.causal:
            raise ConfigError(f"finetune.objective={cls.name} compares the log-probs of replies, token by token, which a "
                              f"bidirectional model (model.causal=false) does not have: set model.causal=true")
        if f.train_on == "all":
            raise ConfigError(f"finetune.train_on=all would count the prompt in each reply's log-prob, and "
                              f"finetune.objective={cls.name} compares replies: use assistant (the default)")
        if dpo.beta <= 0:
            raise ConfigError(f"finetune.dpo.beta={dpo.beta} must be positive (0.1 is usual; smaller lets the policy "
                              f"move further)")
        if not 0 <= dpo.label_smoothing < 0.5:
            raise ConfigError(f"finetune.dpo.label_smoothing={dpo.label_smoothing} must be in [0, 0.5)")
        if dpo.label_smoothing and dpo.loss != "robust":
            raise ConfigError(f"finetune.dpo.label_smoothing={dpo.label_smoothing} goes with finetune.dpo.loss=robust, "
                              f"not {dpo.loss}")
        if dpo.sft_weight < 0:
            raise ConfigError(f"finetune.dpo.sft_weight={dpo.sft_weight} must be 0 (off) or positive")

    def units(self, batch: dict) -> int:
        return int(real_pairs(batch).sum())

    def __call__(self, logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n_chosen, n_rejected = pair_sizes(batch)
        real = (n_chosen > 0) & (n_rejected > 0)  # (b, L/2): the slots that hold a pair
        logp_chosen, logp_rejected = pairs_of(document_sums(logps, batch))
        ref_chosen, ref_rejected = pairs_of(self._reference(batch).to(logp_chosen.dtype))
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

    def _reference(self, batch: dict) -> torch.Tensor:
        return batch["reference"]

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

    def progress(self, metrics: dict[str, float]) -> str:
        return f" reward acc {100 * metrics['reward_accuracy']:.0f}%" if metrics.get("reward_accuracy") is not None else ""

    def validation(self, loss: float, metrics: dict[str, float]) -> tuple[dict[str, float], str]:
        record = {"val_loss": loss, "val_reward_accuracy": metrics["reward_accuracy"],
                  "val_reward_margin": metrics["reward_margin"]}
        return record, (f"val loss {loss:.4f}, reward accuracy {100 * metrics['reward_accuracy']:.1f}%, margin "
                        f"{metrics['reward_margin']:.3f}")

    def evaluate(self, engine, batches: list[dict], count: int, context: EvalContext) -> Preferences | None:
        outcome = engine.evaluate(batches, count)
        return Preferences.of(outcome, context, self.figures)


@register
class Likelihoods(DPO):
    """A model on preference pairs without a reference (one not trained with DPO, in `scalelm eval`): DPO's figures
    against a reference of zeros, so that its rewards are β logp and what counts is `chosen_likelier`."""

    name, reference, figures = "likelihoods", False, "likelihoods"
    fields = tuple(f for f in DPO.fields if f != "reference")
    trains, any_language_model = False, True

    def _reference(self, batch: dict) -> torch.Tensor:
        return torch.zeros_like(batch["loss_mask"], dtype=torch.float32)
