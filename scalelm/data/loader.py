"""Packed, data-parallel-sharded, blended and exactly resumable batches from token shards.

How a batch is made
-------------------
Each shard's tokens form one stream cut into windows of seq_len + 1 tokens with stride seq_len
(window i = tokens[i*L : i*L + L + 1]), so every token but the first is a target exactly once and
documents run into each other separated by the EOS the shard writer put after each one.

Who reads what
--------------
A *consumer* is one loader worker of one data-parallel rank: consumer = dp_rank * W + worker,
C = dp_size * W of them. The units of work are (shard, part) pairs: with S shards, each shard is
split into P = ceil(C / S) parts (part p holds windows p, p+P, ...), so there are always at least
as many units as consumers and small datasets still spread over every rank. Each epoch the units
are shuffled with (seed, epoch) and consumer c takes units[c::C]: no two consumers share a unit.
Within a unit the windows are shuffled with (seed, epoch, shard, part).

Several datasets are blended per window by the deficit rule: the next window comes from the
source furthest behind its weight (argmax_i w_i * (n + 1) - count_i), which is deterministic and
needs nothing but the counts as state.

Resuming
--------
A consumer's whole state is, per source, (epoch, unit, window) plus the blend counts. Every batch
carries the state its worker reached after making it; the loader keeps the newest one per worker
from the batches it actually handed out, so `state_dict()` describes exactly what was consumed,
whatever the workers had prefetched. torch's DataLoader takes batches from its workers round-robin
starting at worker 0; after k batches the next batch is due from logical worker k % W, so a resumed
loader maps physical worker w to logical worker (w + k) % W.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scalelm.config import Config
from scalelm.data.checksum import sha256_file
from scalelm.data.shards import ShardSet, read_manifest, read_shard
from scalelm.errors import DataError

STATE_VERSION = 1


@dataclass(frozen=True)
class Layout:
    """What a loader's order depends on; a saved state only loads into a loader with the same layout."""

    sources: tuple[str, ...]
    split: str
    weights: tuple[float, ...]
    seq_len: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    num_workers: int
    seed: int
    shuffle: bool

    @property
    def workers(self) -> int:
        """Logical workers per rank (the main process counts as one when num_workers is 0)."""
        return max(1, self.num_workers)


class TokenLoader:
    """Iterate micro-batches `{"input_ids": (B, L) int64, "labels": (B, L) int64}` forever.

    Iterating again continues where the last iteration stopped; `state_dict()` / `load_state_dict()`
    carry that position across processes, so a resumed run sees exactly the batches it would have.
    """

    def __init__(self, sources: Sequence[str | Path], *, split: str, seq_len: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0, seed: int = 0,
                 weights: Sequence[float] = (), shuffle: bool = True, tokenizer_sha256: str | None = None,
                 on_bad_shard: str = "error"):
        if not sources:
            raise DataError(f"no {split} data: set data.train to a directory written by `scalelm shard`")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside data-parallel size {dp_size}")
        self.sets = [read_manifest(s, split, tokenizer_sha256) for s in sources]
        first = self.sets[0]
        for other in self.sets[1:]:
            if other.tokenizer_sha256 != first.tokenizer_sha256:
                raise DataError(f"{other.source} and {first.source} were made with different tokenizers: "
                                f"blend only shard sets made with the same one")
        if not weights:
            weights = [s.tokens for s in self.sets]
        if len(weights) != len(self.sets):
            raise DataError(f"{len(weights)} blending weights for {len(self.sets)} sources: give one per source")
        for s in self.sets:
            if s.tokens <= seq_len:
                raise DataError(f"{s.source} ({s.split}) holds {s.tokens} tokens, not one window of "
                                f"train.seq_len + 1 = {seq_len + 1}: add data or shorten train.seq_len")
        total = float(sum(weights))
        self.layout = Layout(tuple(map(str, sources)), split, tuple(w / total for w in weights), seq_len,
                             micro_batch_size, dp_rank, dp_size, num_workers, seed, shuffle)
        self.on_bad_shard = on_bad_shard
        self._batches = 0
        self._states: list[dict | None] = [None] * self.layout.workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = _ConsumerDataset(self.sets, self.layout, self.on_bad_shard, list(self._states),
                                   offset=self._batches % self.layout.workers)
        if self.layout.num_workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.layout.num_workers,
                                      prefetch_factor=4, persistent_workers=False))
        for item in batches:
            self._states[item["worker"]] = item["state"]
            self._batches += 1
            yield {"input_ids": item["input_ids"], "labels": item["labels"]}

    def state_dict(self) -> dict:
        """The position after the last batch handed out (plain Python data, JSON-safe)."""
        return {"version": STATE_VERSION, "batches": self._batches, "workers": copy.deepcopy(self._states),
                "layout": _layout_dict(self.layout)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses a state saved with another data layout."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}: it was written "
                            f"by another scalelm version; resume without loader state")
        saved, ours = state["layout"], _layout_dict(self.layout)
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in ours.items() if saved.get(k) != v]
        if changed:
            raise DataError(f"loader state was saved with another data layout ({'; '.join(changed)}): "
                            f"resume with the same data, batch shape, data-parallel size and workers")
        self._batches = state["batches"]
        self._states = copy.deepcopy(state["workers"])


def loader_from_config(cfg: Config, split: str = "train", dp_rank: int = 0, dp_size: int = 1) -> TokenLoader:
    """The train loader (shuffled) or the val loader (fixed order, data.val or else data.train's val split)."""
    sources = cfg.data.train if split == "train" else (cfg.data.val or cfg.data.train)
    tokenizer_sha = sha256_file(cfg.data.tokenizer) if cfg.data.tokenizer and Path(cfg.data.tokenizer).is_file() else None
    if cfg.data.tokenizer and tokenizer_sha is None:
        raise DataError(f"data.tokenizer={cfg.data.tokenizer} not found: point it at the .model the shards were made with")
    return TokenLoader(sources, split=split, seq_len=cfg.train.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                       dp_rank=dp_rank, dp_size=dp_size, num_workers=cfg.data.num_workers if split == "train" else 0,
                       seed=cfg.data.seed, weights=cfg.data.weights if split == "train" else (),
                       shuffle=split == "train", tokenizer_sha256=tokenizer_sha, on_bad_shard=cfg.data.on_bad_shard)


def _layout_dict(layout: Layout) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in layout.__dict__.items()}


# --------------------------------------------------------------------------- inside a worker


class _ConsumerDataset(IterableDataset):
    """What one loader worker runs: its consumer's blended window streams, batched."""

    def __init__(self, sets: list[ShardSet], layout: Layout, on_bad_shard: str, states: list[dict | None], offset: int):
        self.sets, self.layout, self.on_bad_shard, self.states, self.offset = sets, layout, on_bad_shard, states, offset

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.offset) % self.layout.workers
        consumer = self.layout.dp_rank * self.layout.workers + worker
        consumers = self.layout.dp_size * self.layout.workers
        state = self.states[worker] or {"streams": [None] * len(self.sets), "counts": [0] * len(self.sets)}
        streams = [_WindowStream(s, consumer, consumers, self.layout, self.on_bad_shard, pos)
                   for s, pos in zip(self.sets, state["streams"])]
        counts = list(state["counts"])
        weights = np.asarray(self.layout.weights)
        batch_size = self.layout.micro_batch_size
        while True:
            windows = []
            for _ in range(batch_size):
                # Deficit rule: the source furthest behind its share of the windows drawn so far.
                i = int(np.argmax(weights * (sum(counts) + 1) - np.asarray(counts))) if len(streams) > 1 else 0
                windows.append(streams[i].next_window())
                counts[i] += 1
            tokens = torch.from_numpy(np.stack(windows).astype(np.int64))  # (B, L + 1)
            yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "worker": worker,
                   "state": {"streams": [s.position() for s in streams], "counts": list(counts)}}


class _WindowStream:
    """One consumer's endless sequence of windows from one shard set; position (epoch, unit, window)."""

    def __init__(self, shards: ShardSet, consumer: int, consumers: int, layout: Layout, on_bad_shard: str,
                 position: dict | None):
        self.shards, self.layout, self.on_bad_shard = shards, layout, on_bad_shard
        self.consumer, self.consumers = consumer, consumers
        self.parts = math.ceil(consumers / len(shards.shards))
        position = position or {"epoch": 0, "unit": 0, "window": 0, "skipped": 0}
        self.epoch, self.unit, self.window, self.skipped = (position[k] for k in ("epoch", "unit", "window", "skipped"))
        self._loaded: tuple | None = None  # ((epoch, unit), windows view, order)
        self._units_of: tuple[int, list] | None = None  # (epoch, units)
        self._empty_units = 0

    def position(self) -> dict:
        return {"epoch": self.epoch, "unit": self.unit, "window": self.window, "skipped": self.skipped}

    def next_window(self) -> np.ndarray:
        while True:
            units = self._units(self.epoch)
            if self.unit >= len(units):
                self.epoch, self.unit, self.window = self.epoch + 1, 0, 0
                continue
            windows, order = self._load(units[self.unit])
            if self.window < len(order):
                self._empty_units = 0
                self.window += 1
                return windows[order[self.window - 1]]
            self._empty_units += 1
            if self._empty_units > 2 * len(units):  # a whole epoch and more without a window
                raise DataError(f"{self.shards.source} ({self.shards.split}): no readable windows of "
                                f"{self.layout.seq_len + 1} tokens for data-parallel rank {self.layout.dp_rank}")
            self.unit, self.window = self.unit + 1, 0

    def _units(self, epoch: int) -> list[tuple[int, int]]:
        """This consumer's (shard, part) units in `epoch`, in reading order."""
        if self._units_of is None or self._units_of[0] != epoch:
            units = [(s, p) for s in range(len(self.shards.shards)) for p in range(self.parts)]
            if self.layout.shuffle:
                order = np.random.default_rng([self.layout.seed, epoch]).permutation(len(units))
                units = [units[i] for i in order]
            self._units_of = (epoch, units[self.consumer :: self.consumers])
        return self._units_of[1]

    def _load(self, unit: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        key = (self.epoch, self.unit)
        if self._loaded is None or self._loaded[0] != key:
            shard_index, part = unit
            shard = self.shards.shards[shard_index]
            try:
                tokens = read_shard(shard, self.shards.dtype)
            except DataError as e:
                if self.on_bad_shard != "skip":
                    raise
                warnings.warn(f"skipping bad shard: {e}", stacklevel=2)
                self.skipped += 1
                tokens = np.empty(0, self.shards.dtype)
            L = self.layout.seq_len
            n = max(0, (tokens.size - 1) // L)
            # (n, L + 1) overlapping view: row i is tokens[i*L : i*L + L + 1]; no copy.
            windows = np.lib.stride_tricks.as_strided(tokens, (n, L + 1), (L * tokens.itemsize, tokens.itemsize),
                                                      writeable=False)
            order = np.arange(part, n, self.parts)
            if self.layout.shuffle:
                order = np.random.default_rng([self.layout.seed, self.epoch, shard_index, part]).permutation(order)
            self._loaded = (key, windows, order)
        return self._loaded[1], self._loaded[2]
