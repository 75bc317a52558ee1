"""What a training step reports, as metrics.jsonl keeps it (train/log.py writes the file and reads it back)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepRecord:
    step: int
    loss: float  # the objective's loss over the global batch
    lr: float  # the learning rate the step took
    grad_norm: float | None  # the global gradient norm before clipping
    tokens_per_s: float
    mfu: float | None  # model FLOPs utilisation, PaLM's convention (None on a CPU)
    mfu_megatron: float | None  # Megatron's convention
    mem: int  # peak accelerator memory, or the process's resident memory on a CPU
    units: dict[str, int | None] = field(default_factory=dict)  # the objective's unit and its count ({"targets": n})
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's metrics, each a mean over its units

    def as_json(self) -> dict:
        """One line of metrics.jsonl: the fields, then the units and metrics under their own names."""
        return {"step": self.step, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
                "tokens_per_s": self.tokens_per_s, "mfu": self.mfu, "mfu_megatron": self.mfu_megatron, "mem": self.mem,
                **self.units, **self.metrics}


def loss_text(loss: float) -> str:
    """A loss as the log prints it, 4 decimals; one a hair below zero (RL's, on-policy) reads 0.0000, not -0.0000."""
    return f"{round(loss, 4) + 0.0:.4f}"
