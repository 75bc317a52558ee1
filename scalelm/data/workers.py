"""Ordered parallel map over all cores, for the CPU-heavy steps of the data pipeline."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Iterable, Iterator

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
    # NOTE: fork keeps start-up cheap and lets workers inherit imported modules; the functions
    # run here touch no threads or locks of the parent.
    with multiprocessing.get_context("fork").Pool(workers, initializer, initargs) as pool:
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
