import math

import pytest

from scalelm.errors import TrainingError
from scalelm.train.guards import LossGuard


def test_non_finite_losses_are_counted_and_stop_the_run_after_max_in_a_row():
    guard = LossGuard(max_bad_steps=3, spike_zscore=0)
    assert "step 1: loss is nan, step skipped (1 in a row" in guard.check(1, math.nan, step_applied=False)
    assert guard.check(2, 2.0, step_applied=True) is None and guard.bad_in_a_row == 0
    guard.check(3, math.inf, step_applied=False)
    guard.check(4, math.nan, step_applied=False)
    with pytest.raises(TrainingError, match=r"3 steps in a row \(up to step 5\) had a non-finite loss"):
        guard.check(5, math.nan, step_applied=False)
    assert guard.bad_total == 4


def test_a_non_finite_loss_whose_step_was_applied_is_a_bug():
    with pytest.raises(RuntimeError, match="the optimizer step was applied"):
        LossGuard(3, 0).check(1, math.nan, step_applied=True)


def test_spikes_are_called_against_the_recent_losses_and_the_state_round_trips():
    guard = LossGuard(3, spike_zscore=4.0)
    notes = [guard.check(step, 3.0 + 0.01 * (step % 3), True) for step in range(1, 30)]
    assert not any(notes)
    note = guard.check(30, 4.0, True)
    assert note.startswith("step 30: loss spike 4.0000 (") and "standard deviations above 3.0" in note
    again = LossGuard(3, 4.0, guard.state())
    assert again.state() == guard.state()
    assert guard.check(31, 3.01, True) is None and LossGuard(3, 0.0).check(1, 100.0, True) is None
