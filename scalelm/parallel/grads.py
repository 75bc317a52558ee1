"""Gradients that need a tensor-parallel sum: those of weights applied to a sequence-parallel slice.

Under sequence parallelism each tensor-parallel rank runs the norms, and adds the row-parallel
biases, on its own part of the sequence, so each holds a partial gradient for those replicated
weights. megatron-core marks such parameters `sequence_parallel` (scalelm's norms do too) and its
own trainer sums them after backward. Here a hook sums each one the moment autograd produces it,
before DeepSpeed's gradient accumulation, ZeRO partitioning or pipeline sees it: one mechanism
for every engine and ZeRO stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sum_sequence_parallel_grads(module: torch.nn.Module, group) -> None:
    """Hook every `sequence_parallel` parameter of `module` to all-reduce its gradient over `group`."""
    for param in module.parameters():
        if getattr(param, "sequence_parallel", False) and param.requires_grad:  # frozen ones have no gradient
            param.register_hook(lambda grad: _all_reduced(grad, group))


def _all_reduced(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad
