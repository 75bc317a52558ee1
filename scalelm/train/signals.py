"""SIGTERM and SIGUSR1 as requests the loop acts on between steps, the same step on every rank.

    SIGUSR1   save a checkpoint and go on (SLURM sends it ahead of preemption: --signal=USR1@120)
    SIGTERM   save a checkpoint and stop

A signal may reach some ranks only, so `poll` all-reduces the requests: every rank saves, and
stops, after the same step.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class StopSignals:
    """Catches SIGTERM and SIGUSR1 for the duration of a `with` block (main thread only)."""

    HANDLED = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, device: torch.device):
        self.device = device
        self.received = {sig: False for sig in self.HANDLED}
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.HANDLED:
                self._previous[sig] = signal.signal(sig, self._catch)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _catch(self, signum: int, frame) -> None:
        self.received[signal.Signals(signum)] = True

    def poll(self) -> tuple[bool, bool]:
        """(save now, stop after saving), agreed by every rank; the requests are then cleared."""
        mine, self.received = self.received, {sig: False for sig in self.HANDLED}  # one arriving now waits for the next poll
        flags = torch.tensor([mine[signal.SIGUSR1], mine[signal.SIGTERM]], dtype=torch.int32, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        save, stop = (bool(v) for v in flags.tolist())
        return save or stop, stop
