"""Rows run through a forward-only engine, the data-parallel ranks each taking a share, every rank getting every
row's value: how RL's reward model scores completions and rloo's reference measures its KL, and how an evaluation
scores its requests.

Data-parallel rank d takes rows d, d + dp, ... in micro-batches of exactly `micro` rows (a pipeline fixes its
activations' shape at its first send): a short micro-batch is filled with copies of its first row (of row 0 on a
rank with none), whose values are dropped. The values come from the ranks that compute the loss, tensor rank 0.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from scalelm.batch import Batch
from scalelm.objectives import Output
from scalelm.parallel.topology import gather_objects


def over_data_parallel(engine, n: int, micro: int, batch_of: Callable[[Sequence[int]], Batch], output: Output,
                       value: Callable[[Batch, torch.Tensor, int, int], Any], temperature: float = 1.0,
                       per_call: int | None = None, order: Sequence[int] | None = None) -> list:
    """value(batch, found, k, row) of each of `n` rows, in order, on every rank; `batch_of(rows)` makes the micro-batch
    of `micro` rows, `found` is what `engine.forward_only` gave for it (`output`), k the row's place in it. `per_call`:
    micro-batches per forward pass call (logits are kept until a call ends: few at a time); `order`: the rows in the
    order they are dealt out (e.g. longest first, so a micro-batch holds rows of like lengths). Collective."""
    layout = engine.layout
    mine = list(order if order is not None else range(n))[layout.dp_rank::layout.data]
    count = -(-len(range(0, n, layout.data)) // micro)  # the most micro-batches a data-parallel rank runs
    chunks = [mine[b * micro:(b + 1) * micro] for b in range(count)]
    filled = [chunk + [(chunk or [0])[0]] * (micro - len(chunk)) for chunk in chunks]
    values = {}
    step = per_call or max(count, 1)
    for start in range(0, count, step):
        batches = [batch_of(rows) for rows in filled[start:start + step]]
        found = engine.forward_only(batches if engine.reads_data else [], len(batches), output, temperature)
        if engine.computes_loss:
            for chunk, batch, result in zip(chunks[start:start + step], batches, found):
                values.update({row: value(batch, result, k, row) for k, row in enumerate(chunk)})
    everyone = gather_objects(values if engine.computes_loss and layout.tp_rank == 0 else None)
    merged = {row: v for part in everyone if part for row, v in part.items()}
    return [merged[row] for row in range(n)]
