"""The optimizer a run trains with, handed to the engine as a factory (parallel/engine.py builds it on the module it
wraps): torch's AdamW, fused, with weight decay on matrices only.

Biases, norms and other vectors are not decayed; frozen weights (LoRA's base) are in no group, so AdamW neither holds
state for them nor decays them. The factory also says what state AdamW keeps per parameter, which checkpoints save
whole beside each weight (parallel/state.py), and how to make it before the first step.
"""

from __future__ import annotations

import torch

from scalelm.config import OptimConfig


class AdamW:
    """torch's AdamW (fused), as the engine's optimizer factory: it builds the optimizer for a module and says what
    per-parameter state it keeps, which checkpoints save whole beside each weight (parallel/state.py)."""

    states = ("exp_avg", "exp_avg_sq")  # its moments, each the parameter's shape

    def __init__(self, optim: OptimConfig):
        self.optim = optim

    def __call__(self, module: torch.nn.Module) -> torch.optim.AdamW:
        o = self.optim
        return torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 fused=True)

    @staticmethod
    def empty_state(param: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict:
        """The state a fresh AdamW creates for `param` at its first step: step 0 and zero moments."""
        scalar_on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
        return {"step": torch.zeros((), device=param.device if scalar_on_device else "cpu"),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}

    @staticmethod
    def steps(state: dict) -> int:
        """The steps a parameter's state has taken (the bias correction's t)."""
        return int(state["step"])

    @staticmethod
    def set_steps(state: dict, steps: int) -> None:
        state["step"].fill_(steps)


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (see the module docstring). An empty group is left out (DeepSpeed drops it, and
    the schedule would then count one group too many)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
