"""One training run at a time on a checkpoint.dir: the hold, a file naming the run that saves there.

    checkpoint.dir/HOLD    {"host", "pid", "job", "since"}    its mtime renewed every parallel.timeout / 10 s

Rank 0 takes the hold (a hard link to the file it wrote: atomic on a shared file system too) before anything reads a
checkpoint, and removes it when the run ends. A run that finds a live hold is refused with one line naming the
holder. A hold is stale, and taken over with a note in events.log, when it is the same job's earlier run (a
SLURM requeue, Ray restarting its workers: SLURM_JOB_ID, SCALELM_JOB_ID, torchrun's run id), when its process
is gone (a holder on this host), or when it was not renewed for parallel.timeout seconds (a holder on another
host, whose processes this one cannot see).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from scalelm.data.files import make_dir
from scalelm.errors import CheckpointError
from scalelm.parallel.topology import Layout, gather_objects
from scalelm.parallel.watchdog import beat_interval

HOLD = "HOLD"


def job_id() -> str | None:
    """The job this process belongs to, as the scheduler names it; None for a run started by hand."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        return f"SLURM job {env['SLURM_JOB_ID']}"
    if env.get("SCALELM_JOB_ID"):
        return env["SCALELM_JOB_ID"]
    run = env.get("TORCHELASTIC_RUN_ID")
    return f"torchrun run {run}" if run and run != "none" else None


class Hold:
    """The hold on `root` for the duration of a `with` block; collective: every rank enters, rank 0 holds.
    `note` is the takeover of a stale hold, for the run's log, or None."""

    def __init__(self, root: Path, timeout: float, layout: Layout):
        self.path, self.timeout, self.layout = root / HOLD, timeout, layout
        self.interval = beat_interval(timeout)  # renewed as often as a rank beats
        self.mine: dict | None = None
        self.note: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Hold":
        outcome = None
        if self.layout.rank == 0:
            try:
                self.note = self._take()
            except CheckpointError as e:
                outcome = str(e)
        outcome = gather_objects(outcome)[0]  # rank 0's answer for every rank: all start, or all stop
        if outcome is not None:
            raise CheckpointError(outcome)
        if self.mine is not None:
            self._thread = threading.Thread(target=self._renew, name="scalelm-hold", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Give the hold back (from any thread), if this rank still has it."""
        self._stop.set()
        if self.mine is not None and _read(self.path) == self.mine:
            self.path.unlink(missing_ok=True)
        self.mine = None

    def _take(self) -> str | None:
        make_dir(self.path.parent, "checkpoint.dir")
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(), "since": time.time()}
        note = None
        for _ in range(3):  # another run may take or drop it between our looks
            written = self.path.with_name(f"{HOLD}.{mine['host']}-{mine['pid']}")
            written.write_text(json.dumps(mine))
            try:
                os.link(written, self.path)  # whole or not at all, and only where there is none (NFS too)
                self.mine = mine
                return note
            except FileExistsError:
                pass
            finally:
                written.unlink()
            holder, age = _read(self.path), _age(self.path)
            if holder is None or age is None:
                continue  # removed, or being written, just now
            why = self._stale(holder, age, mine)
            if why is None:
                raise CheckpointError(
                    f"checkpoint.dir={self.path.parent} is in use by another run: {_who(holder)}, holding it since "
                    f"{time.strftime('%H:%M:%S', time.localtime(holder['since']))} and renewed {age:.0f} s ago; wait for "
                    f"it to end or stop it, or set checkpoint.dir elsewhere (a hold not renewed for parallel.timeout="
                    f"{self.timeout:g} s is stale; {self.path} can be removed once that run is gone)")
            aside = self.path.with_name(f"{HOLD}.stale-{os.getpid()}")
            try:
                os.rename(self.path, aside)  # one taker wins the rename; the others look again
            except FileNotFoundError:
                continue
            aside.unlink(missing_ok=True)
            note = f"took over checkpoint.dir's hold from {_who(holder)}: {why}"
        raise CheckpointError(f"checkpoint.dir={self.path.parent}: its hold ({self.path}) changed hands three times while "
                              f"this run tried to take it: another run is starting there")

    def _stale(self, holder: dict, age: float, mine: dict) -> str | None:
        """Why `holder`'s hold is stale, or None while it is live."""
        if holder.get("job") and holder["job"] == mine["job"]:
            return "an earlier run of this job"
        if holder.get("host") == mine["host"] and not _alive(holder.get("pid")):
            return "that process is gone"
        if age > self.timeout:
            return f"not renewed for {age:.0f} s (parallel.timeout={self.timeout:g})"
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the shared file system is away for a moment; the next renewal tries again


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _age(path: Path) -> float | None:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _who(holder: dict) -> str:
    job = f", {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}"
