"""Ordered parallel map over all cores, for the CPU-heavy steps of the data pipeline; where every worker process
of scalelm's data (this map's, the loader's) starts from.

Worker processes start from a forkserver, never as forks of the process that asks for them: that process may run
threads (torch's pools; a training rank's gloo, watchdog and checkpoint writers), and a fork taken while one of them
holds a lock can crash or hang the child (both seen in CI), and a fork inherits signal handlers (a training rank's
SIGTERM handler made a pool's workers ignore their terminate). The forkserver is a fresh process that imports
PRELOADED once (`preload_workers`, at a process's start); each worker is a cheap fork of it.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Iterable, Iterator

# what the workers run: the readers of the loader and the tokenizing steps (torch, sentencepiece, webdataset)
PRELOADED = ["scalelm.data.window_stream", "scalelm.data.shards"]
WORKERS = multiprocessing.get_context("forkserver")


def preload_workers(extra: Iterable[str] = ()) -> None:
    """Have the forkserver import PRELOADED (and `extra`) when it starts: call at a process's start, before any
    worker is asked for. (The forkserver is one per process; what it preloads is fixed when it starts.)"""
    multiprocessing.set_forkserver_preload([*PRELOADED, *extra])

# NOTE: the batch size of the data pipeline's work, in characters of text: large enough that sending
# a batch to a worker costs little next to the work on it, small enough to keep every core busy.
BATCH_CHARS = 1 << 20


def default_workers() -> int:
    """All the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def imap_ordered(fn: Callable[[Any], Any], items: Iterable[Any], workers: int,
                 initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[Any]:
    """`map(fn, items)` over `workers` processes, results in input order; inline when workers <= 1.

    `fn` and `initializer` must be module-level functions (they are sent to the workers by name).
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    with WORKERS.Pool(workers, initializer, initargs) as pool:
        yield from pool.imap(fn, items, chunksize=1)


def batches_of_text(texts: Iterable[str], chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    """Consecutive texts grouped into lists of about `chars` characters (a long text makes its own batch)."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
