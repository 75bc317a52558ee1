"""Guards on the loss: a non-finite loss is a skipped step (DeepSpeed's ZeRO optimizer skips a step
whose gradients are not finite); too many in a row stop the run. A loss far above the recent ones is
a spike: logged with where its batch came from, so the data can be looked at."""

from __future__ import annotations

import math
import statistics
from collections import deque

from scalelm.errors import TrainingError

WINDOW = 100  # steps whose losses a spike is measured against
MIN_HISTORY = 10  # no spike is called before this many steps


class LossGuard:
    def __init__(self, max_bad_steps: int, spike_zscore: float, state: dict | None = None):
        self.max_bad_steps, self.spike_zscore = max_bad_steps, spike_zscore
        state = state or {}
        self.bad_in_a_row: int = state.get("bad_in_a_row", 0)
        self.bad_total: int = state.get("bad_total", 0)
        self.history: deque[float] = deque(state.get("history", []), maxlen=WINDOW)

    def state(self) -> dict:
        return {"bad_in_a_row": self.bad_in_a_row, "bad_total": self.bad_total, "history": list(self.history)}

    def check(self, step: int, loss: float, step_applied: bool) -> str | None:
        """A line for the log when `loss` is not finite or a spike; raises TrainingError after
        max_bad_steps non-finite losses in a row."""
        if not math.isfinite(loss):
            if step_applied:  # a bug, not bad data: weights would now be poisoned
                raise RuntimeError(f"step {step}: loss {loss} but the optimizer step was applied")
            self.bad_in_a_row += 1
            self.bad_total += 1
            if self.bad_in_a_row >= self.max_bad_steps:
                raise TrainingError(f"{self.bad_in_a_row} steps in a row (up to step {step}) had a non-finite loss: "
                                    f"stopped. Lower optim.lr or look at the data, then resume from the last checkpoint")
            return (f"step {step}: loss is {loss}, step skipped ({self.bad_in_a_row} in a row, "
                    f"{self.max_bad_steps} stop the run)")
        self.bad_in_a_row = 0
        note = None
        if self.spike_zscore > 0 and len(self.history) >= MIN_HISTORY:
            mean, std = statistics.fmean(self.history), statistics.pstdev(self.history)
            if std > 0 and (loss - mean) / std > self.spike_zscore:
                note = f"step {step}: loss spike {loss:.4f} ({(loss - mean) / std:.1f} standard deviations above {mean:.4f})"
        self.history.append(loss)
        return note
