"""Spawn real ranks on this machine and collect what each returns: the harness of the distributed tests.

Each rank is a fresh process with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, as torchrun would
set them. It is forked from a forkserver, not from the test process (that has torch's thread pools running): a
clean process, started once per test process, that has imported the engines and the workloads. Importing them
takes about 10 s of CPU, which each rank would otherwise pay again. (Not on a machine with a GPU: spawn there.)
"""

from __future__ import annotations

import io
import os
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from scalelm.data.workers import preload_workers
from scalelm.parallel.topology import free_port


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 600) -> list[Any]:
    """fn(*args) on `world_size` ranks over gloo; their return values in rank order. A rank's error fails the call.

    NOTE: the rendezvous port is free when chosen but not reserved: another process on the machine (a Ray
    worker of a test running beside this one) may take it before rank 0 listens on it. Rank 0 then fails
    at once, before fn has done anything, and the ranks are started again on another port."""
    for attempt in range(3):
        try:
            return _run_once(world_size, fn, args, timeout)
        except _PortTaken:
            if attempt == 2:
                raise RuntimeError("three rendezvous ports in a row were taken before rank 0 could listen") from None
    raise AssertionError("unreachable")


PRELOAD = ["tests.helpers.workloads", "tests.helpers.rl", "tests.helpers.batches", "tests.helpers.decoding", "scalelm.train.loop",
           "scalelm.train.finetune", "scalelm.parallel.engine", "scalelm.infer.evaluate", "scalelm.train.score"]


class _PortTaken(Exception):
    pass


def _run_once(world_size: int, fn: Callable[..., Any], args: tuple, timeout: float) -> list[Any]:
    # NOTE: where there is a GPU, the engines' imports ask CUDA about it, which a fork does not survive: spawn
    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "forkserver")
    preload_workers(PRELOAD)  # read when the server starts, at the first call (or the data workers')
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(rank, world_size, port, fn, args, results)) for rank in range(world_size)]
    for p in procs:
        p.start()
    gathered: dict[int, Any] = {}
    failed = True
    try:
        for _ in procs:
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                if "EADDRINUSE" in value:
                    raise _PortTaken()
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            gathered[rank] = torch.load(io.BytesIO(value), weights_only=False)
        failed = False
    finally:
        for p in procs:
            p.join(timeout=0 if failed else 30)  # after a failure the others may wait on it forever
            if p.is_alive():
                p.kill()
                p.join()
    return [gathered[r] for r in range(world_size)]


def _entry(rank: int, world_size: int, port: int, fn, args, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        # NOTE: sent as bytes: torch would share tensors through file descriptors that die with this process.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
