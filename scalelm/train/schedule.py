"""Learning rate: linear warmup from 0 to optim.lr, then cosine (or linear) decay to optim.min_lr. The engine is
handed it as a function of the step (`Schedule`): the count of optimizer steps applied, a skipped step not moving it.

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


class Schedule:
    """The engine's schedule: the factor of optim.lr (each parameter group's initial lr) after `step` applied steps."""

    def __init__(self, optim: OptimConfig):
        self.optim = optim

    def __call__(self, step: int) -> float:
        return lr_at(step, self.optim) / self.optim.lr


def lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The same schedule as a torch scheduler, for a loop written by hand (bench/train_throughput.py's plain loop);
    the optimizer's base lr must be optim.lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(optim))
