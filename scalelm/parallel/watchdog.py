"""Peers that go silent (a lost host, a stopped or hung rank) end the run with one line naming them, not a hang.

Every rank's thread writes its beat to the rendezvous store, `scalelm/beat/RANK` = "COUNT STEP STATE HOST PID",
every min(parallel.timeout / 10, 10) seconds. Rank 0's thread reads every beat and the others read rank 0's (and
the verdict), so the store answers a few reads per rank and beat, not one per pair of ranks. A beat that has not
changed for parallel.timeout seconds is a silent rank: rank 0 posts the verdict under `scalelm/silent`, and every
rank's thread prints it and ends its process with status 75 (EX_TEMPFAIL: resume once the hosts are back). The
thread does it, not the main one, which may be blocked in a collective that NCCL would abort on its own timeout
without a word of ours; the process group's timeout is longer (parallel/topology.py: process_group_timeout) so this one comes first.

A collective that fails at once (gloo sees a killed peer's connection close) is explained by `explain`: the rank
marks its beat failed, watches every beat for three beats, and names the ranks that stopped without failing, or,
when none did, the ranks still in an earlier step than the others (alive, but stuck).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from scalelm import compat
from scalelm.errors import PeerLost, ScalelmError, Stopped
from scalelm.parallel.topology import Layout

EXIT_STATUS = 75
VERDICT = "scalelm/silent"


def beat_interval(timeout: float) -> float:
    return min(timeout / 10, 10.0)


class Watchdog:
    """The heartbeat for the duration of a `with` block; nothing on one rank. The loop sets `step`."""

    def __init__(self, timeout: float, layout: Layout, before_exit: Callable[[], None] = lambda: None):
        self.timeout, self.rank, self.world = timeout, layout.rank, layout.world
        self.before_exit = before_exit  # what must not be left behind when the thread ends the process
        self.interval = beat_interval(timeout)
        self.step = 0  # the step the main thread is in
        self.state = "ok"  # "failed" once this rank is explaining an error
        self._count = 0
        self._seen: dict[int, tuple[bytes, float]] = {}  # rank -> (its last beat, when it changed, on our clock)
        self._stop = threading.Event()
        self._verdict = threading.Lock()  # whoever holds it tells the run's end: the thread, or explain
        self._store = None
        self._thread: threading.Thread | None = None
        self._me = f"{socket.gethostname()} {os.getpid()}"

    def __enter__(self) -> "Watchdog":
        if self.world > 1:
            self._store = compat.default_store().clone()  # a client of this thread's own
            self._store.set_timeout(timedelta(seconds=self.timeout))  # a store that long away is itself lost
            self._beat()
            dist.barrier()  # every beat is in the store before anyone reads one
            self._thread = threading.Thread(target=self._run, name="scalelm-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind, error, tb) -> None:
        lost = None
        if isinstance(error, Exception) and not isinstance(error, (ScalelmError, Stopped)) and self._store is not None:
            lost = self.explain()
        elif error is None and self._store is not None:
            dist.barrier()  # nobody's store goes away while a rank still beats
        self._stop.set()
        if lost:
            raise PeerLost(lost) from None

    def explain(self) -> str | None:
        """After a failed collective: the line naming the ranks at fault, or None when none can be told."""
        self._verdict.acquire()  # never given back: the run is ending, and this says why
        self.state = "failed"
        keys = [_key(r) for r in range(self.world)]
        try:
            self._beat()
            before = self._store.multi_get(keys)
            time.sleep(3 * self.interval)
            after = [_Beat(v) for v in self._store.multi_get(keys)]
        except Exception as e:  # noqa: BLE001 - the store's own error says no more than that it is gone
            return _no_store(e)
        silent = [r for r, (b, a) in enumerate(zip(before, after)) if b == a.raw and a.state != "failed" and r != self.rank]
        if silent:
            return f"{_ranks(silent, after)} stopped answering in step {after[silent[0]].step}: its host is lost, or " \
                   f"the process was killed; stopping. {RESUME}"
        steps = {a.step for a in after if a.state == "ok"}
        if len(steps) > 1:
            behind = [r for r, a in enumerate(after) if a.state == "ok" and a.step == min(steps)]
            return f"{_ranks(behind, after)} is still in step {min(steps)} while others are in step {max(steps)}: " \
                   f"alive but stuck (`py-spy dump --pid PID` shows where); stopping. {RESUME}"
        return None

    def _beat(self) -> None:
        self._count += 1
        self._store.set(_key(self.rank), f"{self._count} {self.step} {self.state} {self._me}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                verdict = self._watch()
            except Exception as e:  # noqa: BLE001
                if self._stop.wait(self.interval):
                    return  # the run ended, and rank 0's store with it
                verdict = _no_store(e)
            if verdict:
                self._tell(verdict)

    def _watch(self) -> str | None:
        """The verdict, once a watched rank's beat has not changed for `timeout` seconds."""
        if self.rank != 0 and self._store.check([VERDICT]):
            return self._store.get(VERDICT).decode()
        ranks, now = list(range(self.world)) if self.rank == 0 else [0], time.monotonic()
        beats = self._store.multi_get([_key(r) for r in ranks])
        for rank, raw in zip(ranks, beats):
            if rank not in self._seen or self._seen[rank][0] != raw:
                self._seen[rank] = (raw, now)
        silent = [r for r in ranks if now - self._seen[r][1] > self.timeout]
        if not silent:
            return None
        parsed = {r: _Beat(raw) for r, raw in zip(ranks, beats)}
        verdict = (f"{_ranks(silent, parsed)} sent no heartbeat for {self.timeout:g} s (parallel.timeout) in step "
                   f"{parsed[silent[0]].step}: its host is lost, or the process is stopped or hung; stopping. {RESUME}")
        if self.rank == 0:
            self._store.set(VERDICT, verdict)
        return verdict

    def _tell(self, verdict: str) -> None:
        if self._verdict.acquire(blocking=False):  # else the main thread is explaining an error itself
            print(f"scalelm: error: {verdict}", file=sys.stderr, flush=True)
            self.before_exit()
            os._exit(EXIT_STATUS)


RESUME = "The newest checkpoint is intact: run the same command to resume from it"


class _Beat:
    def __init__(self, raw: bytes):
        self.raw = raw
        count, step, self.state, self.host, self.pid = raw.decode().split()
        self.step = int(step)


def _key(rank: int) -> str:
    return f"scalelm/beat/{rank}"


def _ranks(ranks: list[int], beats) -> str:
    named = [f"rank {r} ({beats[r].host}, pid {beats[r].pid})" for r in ranks[:4]]
    return ", ".join(named) + (f" and {len(ranks) - 4} more" if len(ranks) > 4 else "")


def _no_store(error: Exception) -> str:
    return (f"the rendezvous store does not answer ({str(error).splitlines()[0] if str(error) else type(error).__name__}): "
            f"the host of rank 0 (or of the launcher's store) is lost; stopping. {RESUME}")
