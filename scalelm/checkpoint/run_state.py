"""Where a run stands after a step: what every checkpoint's manifest keeps under "run", read back on resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RunState:
    step: int = 0  # the last step trained
    consumed_tokens: int = 0  # tokens of the global batches trained on so far
    guard: dict | None = None  # the loss guard's window of recent losses and its counts (train/guards.py)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "RunState":
        return cls(step=saved["step"], consumed_tokens=saved.get("consumed_tokens", 0), guard=saved.get("guard"))
