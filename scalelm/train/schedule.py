"""Learning rate: linear warmup from 0 to optim.lr, then cosine (or linear) decay to optim.min_lr.

    step < W:            lr * (step + 1) / W
    W <= step < D:       min + (lr - min) * shape((step - W) / (D - W)),  shape = (1 + cos(pi p)) / 2 or 1 - p
    step >= D:           min_lr
"""

from __future__ import annotations

import math

import torch

from scalelm.config import OptimConfig


def lr_at(step: int, optim: OptimConfig) -> float:
    warmup, decay_end = optim.warmup_steps, max(optim.decay_steps, optim.warmup_steps)
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.decay == "constant" or step >= decay_end:
        return optim.lr if optim.decay == "constant" else optim.min_lr
    progress = (step - warmup) / max(1, decay_end - warmup)
    shape = (1 + math.cos(math.pi * progress)) / 2 if optim.decay == "cosine" else 1 - progress
    return optim.min_lr + (optim.lr - optim.min_lr) * shape


def lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A torch scheduler following `lr_at`; the optimizer's base lr must be optim.lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, optim) / optim.lr)
