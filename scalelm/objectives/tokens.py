"""Per-token quantities of a language model's output, its logits split over tensor ranks by vocabulary.

    logits (s, b, V/tp)  ->  token_losses: -log p(label) (s, b)     token_logps: log p(label) (b, s)
                             token_hits: argmax = label (s, b)       token_entropy: H of each position (s, b)

Each is whole on every tensor rank (megatron's vocabulary-parallel cross entropy reduces over the group).
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


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(b, s) float32: log p(label) at every position; consumes fp32 logits as token_losses does."""
    return -token_losses(logits, labels).t()


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


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(s, b) float32: the entropy of each position's next-token distribution; logits (s, b, V/tp) split over tensor
    ranks, whole on every one (three reductions over the group: the max, Σ exp and Σ exp x logit)."""
    logits = logits.float()
    top = logits.max(dim=-1, keepdim=True).values
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    shifted = logits - top
    exp = shifted.exp()
    sums = torch.stack([exp.sum(-1), torch.where(exp > 0, exp * shifted, 0.0).sum(-1)])  # 0 x -inf: padded ids
    if tp > 1:
        dist.all_reduce(sums, group=parallel_state.get_tensor_model_parallel_group())
    total, weighted = sums
    return total.log() - weighted / total
