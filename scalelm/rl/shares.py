"""Rows of a rollout run through a forward-only engine, the data-parallel ranks each taking a share, every rank
getting every row's value: how the reward model scores completions and rloo's reference measures its KL.

Data-parallel rank d takes rows d, d + dp, ... in micro-batches of exactly `micro` rows (a pipeline fixes its
activations' shape at its first send): a short micro-batch is filled with copies of its first row (of row 0 on a
rank with none), whose values are dropped. The values come from the ranks that compute the loss, tensor rank 0.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from scalelm.batch import Batch
from scalelm.objectives import Output
from scalelm.parallel.topology import gather_objects


def over_data_parallel(engine, n: int, micro: int, batch_of: Callable[[Sequence[int]], Batch], output: Output,
                       value: Callable[[Batch, torch.Tensor, int, int], float], temperature: float = 1.0) -> list[float]:
    """value(batch, found, k, row) of each of `n` rows, in order, on every rank; `batch_of(rows)` makes the micro-batch
    of `micro` rows, `found` is what `engine.forward_only` gave for it (`output`), k the row's place in it. Collective."""
    layout = engine.layout
    mine = list(range(layout.dp_rank, n, layout.data))
    count = -(-len(range(0, n, layout.data)) // micro)  # the most micro-batches a data-parallel rank runs
    chunks = [mine[b * micro:(b + 1) * micro] for b in range(count)]
    filled = [chunk + [(chunk or [0])[0]] * (micro - len(chunk)) for chunk in chunks]
    batches = [batch_of(rows) for rows in filled]
    found = engine.forward_only(batches if engine.reads_data else [], count, output, temperature)
    values = {}
    if engine.computes_loss:
        for chunk, batch, result in zip(chunks, batches, found):
            values.update({row: value(batch, result, k, row) for k, row in enumerate(chunk)})
    everyone = gather_objects(values if engine.computes_loss and layout.tp_rank == 0 else None)
    merged = {row: v for part in everyone if part for row, v in part.items()}
    return [merged[row] for row in range(n)]
