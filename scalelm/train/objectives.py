"""Objectives: what a run minimises, as a sum over its units (target tokens, or pairs) that the engine normalises.

    objective.units(batch)      -> n        the micro-batch's units (`objective.unit`), from the batch alone
    objective(logits, batch)    -> (loss_sum, metric_sums)

The engine (parallel/engine.py) knows every micro-batch of a step before the first forward pass, so
it divides by the units of the whole global batch, over micro-batches and data-parallel ranks:

    loss = Σ_{micro-batches, ranks} loss_sum / Σ_{micro-batches, ranks} n

which is token-weighted, not a mean of per-micro-batch means (those differ as soon as micro-batches
hold different numbers of target tokens, as SFT's masked conversations do). Metric sums are divided
by the same count. An objective reads only `fields` of a batch, which is all the last pipeline stage
receives of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy per token, (s, b); logits (s, b, V/tp) split over tensor ranks, labels (b, s).

    NOTE: megatron's kernel works in place on fp32 logits (it saves a copy of the largest activation of
    the step), so fp32 logits are consumed: use them for nothing after this."""
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())


@torch.no_grad()
def token_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(s, b) bool: whether the most likely token is the label; logits (s, b, V/tp) split over tensor ranks."""
    best, index = logits.max(dim=-1)  # (s, b): this rank's slice of the vocabulary
    index = index + parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return index == labels.t()
    group = parallel_state.get_tensor_model_parallel_group()
    overall = best.clone()
    dist.all_reduce(overall, op=dist.ReduceOp.MAX, group=group)
    hits = ((best == overall) & (index == labels.t())).to(torch.int32)  # on the rank whose slice holds the best
    dist.all_reduce(hits, group=group)
    return hits > 0


class NextToken:
    """Cross entropy of the next token over the batch's targets: every token when the batch has no
    `loss_mask` (pretraining), the mask's when it has one (SFT: a chat's assistant turns and their <|end|>).
    Metric: accuracy, the share of targets whose most likely next token is the right one."""

    fields = ("labels", "loss_mask")
    metrics = ("accuracy",)
    unit = "targets"
    reference_pass = False

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


def objective_for(cfg, stage: str):
    """The objective of a run: pretraining's next token over every token, or finetune.objective (sft: the same over
    the chat's targets; dpo: train/dpo.py, its reference the base without adapters under LoRA, else scored;
    reward and classify: train/heads.py, a classification head's Bradley-Terry loss or cross entropy)."""
    if stage == "finetune" and cfg.finetune.objective == "dpo":
        from scalelm.train.dpo import DPO

        return DPO(cfg.finetune.dpo, reference_pass=cfg.finetune.lora is not None)
    if stage == "finetune" and cfg.finetune.objective in ("reward", "classify"):
        from scalelm.train.heads import Classify, Reward

        return Reward() if cfg.finetune.objective == "reward" else Classify()
    return NextToken()
