"""A run's checkpoints, with training blocked only while a snapshot is taken (checkpoint.background).

In the background (the default) a save goes through four parts (checkpoint/save.py has the protocol):

    snapshot  collective; training waits    the save before it finished first; STEP.tmp made, the writers agreed,
                                            every tensor gathered whole and this rank's share copied into host
                                            memory (pinned on a GPU), with the RNG states, loader position and
                                            counters of the same moment
    write     this rank's thread            its files written from the copies: SHA-256 and fsync
    poll      collective, after every step  whether any rank is still busy (one all-reduce); when none is, the
                                            reports are gathered and rank 0 commits in its thread (manifest,
                                            rename, `latest`, pruning); when that is done, the save is
    wait      collective                    polls until the save is done: before the next save, at the end of the
                                            run, on SIGTERM and SIGUSR1, and before a training error is raised

Every promise of the synchronous save holds: `latest` moves only after every rank has written, since rank 0
commits only once no rank is busy; a kill at any moment, in the background write too, leaves STEP.tmp and the
previous `latest`; a rank that cannot write makes every rank raise the same CheckpointError at the same step.
Memory: one snapshot at a time, this rank's share of the whole fp32 tensors (on one rank all of them: 12 bytes a
trained parameter), kept from one save to the next, so that copying into it costs no page faults.

With checkpoint.background=false, `save` does everything at once and streams each tensor to disk as it is
gathered: one tensor in host memory, and training waits for the whole save.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as joined
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from scalelm.checkpoint import rng, store
from scalelm.checkpoint.run_state import RunState
from scalelm.checkpoint.save import Save, agree, attempt, begin, collect, commit, gathered, save_checkpoint, size, write
from scalelm.config import Config
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import Layout


@dataclass
class _InFlight:
    save: Save
    why: str
    started: float
    blocked: float  # seconds training waited for the snapshot
    future: Future  # this rank's write, then (rank 0) the commit
    manifest: dict | None = None  # once every rank has written


class Checkpoints:
    """The saves of one run on this rank. `save`, `poll` and `wait` are collective: every rank calls them after
    the same steps. `note(step, text)` tells the run's log when a checkpoint is committed."""

    def __init__(self, cfg: Config, layout: Layout, engine: Engine, identity: dict, note: Callable[[int, str], None],
                 newest: int | None):
        self.cfg, self.layout, self.engine, self.note = cfg, layout, engine, note
        self.identity = identity  # begin's tokenizer_sha256, base and reference
        self.newest = newest  # the step of the newest committed checkpoint
        self.pool = ThreadPoolExecutor(1, "checkpoint") if cfg.checkpoint.background else None
        self.copies: dict[str, torch.Tensor] = {}  # the snapshot's host buffers, by key in file
        self.flight: _InFlight | None = None

    def save(self, step: int, run: RunState, loader_state: dict | None, why: str, wait: bool = False) -> None:
        """Save the state after `step`, and with `wait` be done with it before returning."""
        if step not in (self.newest, self.flight and self.flight.save.step):
            self.wait()  # one snapshot at a time
            if self.pool is None:
                saved = save_checkpoint(self.cfg, self.layout, self.engine, step, run, loader_state, **self.identity)
                self._saved(step, f"{why}; {saved['bytes'] / 1e6:,.1f} MB in {saved['seconds']:.1f} s")
            else:
                started = time.perf_counter()
                save = begin(self.cfg, self.layout, self.engine, step, run, loader_state, **self.identity)
                tensors = list(gathered(save, self.engine, self._buffer))
                states, metadata = rng.capture()
                if self.layout.device.type == "cuda":
                    torch.cuda.synchronize(self.layout.device)  # the copies to pinned memory have landed
                self.flight = _InFlight(save, why, started, time.perf_counter() - started, self.pool.submit(
                    write, save, tensors, ({k: v.clone() for k, v in states.items()}, metadata)))
        if wait:
            self.wait()

    def poll(self) -> None:
        """Move the save in flight on, if every rank is past its part (see the module's docstring)."""
        flight = self.flight
        if flight is None or self._any_busy(flight.future):
            return
        if flight.manifest is None:  # every rank has written, or failed to
            error = flight.future.exception()  # not OSError (write reports those): a bug, still one error on every rank
            if error is not None:
                flight.save.report["failed"] = f"{type(error).__name__}: {error}"
            self.flight = None  # until collect has not raised
            flight.manifest = collect(flight.save, self.layout)  # every rank raises if any failed
            flight.future = self.pool.submit(attempt, commit, flight.save, flight.manifest) if self.layout.rank == 0 \
                else _done(None)
            self.flight = flight
            return
        self.flight = None
        agree(flight.future.result(), flight.save.step)  # rank 0's commit failed: every rank raises
        self._saved(flight.save.step, f"{flight.why}; {size(flight.manifest) / 1e6:,.1f} MB; training waited "
                    f"{flight.blocked:.2f} s for the snapshot ({flight.save.bytes / 1e6:,.1f} MB in host memory on "
                    f"rank {self.layout.rank}), written in the background in {time.perf_counter() - flight.started:.1f} s")

    def wait(self) -> None:
        """Finish the save in flight, if any."""
        while self.flight is not None:
            joined([self.flight.future])
            self.poll()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        """Let this rank's write finish, not commit it (that takes every rank): after an error, the save in flight
        stays STEP.tmp; a run that ends well has waited for it already."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _buffer(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The host buffer `key` is copied into, the last save's when it has the same shape."""
        copy = self.copies.get(key)
        if copy is None or copy.shape != shape:
            copy = self.copies[key] = torch.empty(shape, pin_memory=self.layout.device.type == "cuda")
        return copy

    def _any_busy(self, future: Future) -> bool:
        busy = torch.tensor([0 if future.done() else 1], device=self.layout.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(busy, op=dist.ReduceOp.MAX)
        return bool(busy.item())

    def _saved(self, step: int, how: str) -> None:
        self.newest = step
        self.note(step, f"saved {store.step_dir(Path(self.cfg.checkpoint.dir), step)} ({how})")


def _done(result) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future
