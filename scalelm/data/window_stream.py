"""What one loader worker runs (data/loader.py says who reads what): its reader's window stream from each shard
set, blended by the deficit rule and batched, with the position that resumes it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from scalelm.data.packing import ChatWindows, TextWindows, window_count
from scalelm.data.reference import load_values
from scalelm.data.shards import ShardSet, read_shard_fields
from scalelm.errors import DataError


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


def window_counts(shards: ShardSet, seq_len: int) -> list[int]:
    return [window_count(s, seq_len, shards.pairs) for s in shards.shards]



class ReaderDataset(IterableDataset):
    """What one loader worker runs: its reader's blended window streams, batched."""

    def __init__(self, sets: list[ShardSet], layout: Layout, on_bad_shard: str, states: list[dict | None], offset: int,
                 document_mask: bool = False, train_on: str = "assistant"):
        self.sets, self.layout, self.on_bad_shard, self.states, self.offset = sets, layout, on_bad_shard, states, offset
        self.windows = {"document_mask": document_mask, "train_on": train_on}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.offset) % self.layout.workers
        reader = self.layout.dp_rank * self.layout.workers + worker
        readers = self.layout.dp_size * self.layout.workers
        state = self.states[worker] or {"streams": [None] * len(self.sets), "counts": [0] * len(self.sets)}
        streams = [WindowStream(s, reader, readers, self.layout, self.on_bad_shard, pos, **self.windows)
                   for s, pos in zip(self.sets, state["streams"])]
        counts = list(state["counts"])
        weights = np.asarray(self.layout.weights)
        while True:
            windows, origins = [], []
            for _ in range(self.layout.micro_batch_size):
                # Deficit rule: the source furthest behind its share of the windows drawn so far.
                i = int(np.argmax(weights * (sum(counts) + 1) - np.asarray(counts))) if len(streams) > 1 else 0
                windows.append(streams[i].next_window())
                origins.append(streams[i].origin)
                counts[i] += 1
            batch = {key: torch.from_numpy(np.stack([w[key] for w in windows])) for key in windows[0]}  # (B, L) each
            yield {**batch, "origin": origins, "worker": worker,
                   "state": {"streams": [s.position() for s in streams], "counts": list(counts)}}


class WindowStream:
    """One reader's endless windows from one shard set; position (epoch, segment, window, bad shards)."""

    def __init__(self, shards: ShardSet, reader: int, readers: int, layout: Layout, on_bad_shard: str,
                 position: dict | None, document_mask: bool = False, train_on: str = "assistant"):
        self.shards, self.layout, self.on_bad_shard = shards, layout, on_bad_shard
        self.document_mask, self.train_on = document_mask, train_on
        self.reader = reader
        self.counts = window_counts(shards, layout.seq_len)
        self.per_reader = sum(self.counts) // readers
        position = position or {"epoch": 0, "segment": 0, "window": 0, "bad_shards": []}
        self.epoch, self.segment, self.window = position["epoch"], position["segment"], position["window"]
        self.bad_shards: list[int] = list(position["bad_shards"])
        self._segments_of: tuple[int, list] | None = None  # (epoch, segments)
        self._loaded: tuple | None = None  # ((epoch, segment), windows, order)
        self.origin = ""  # "SHARD@TOKEN_OFFSET" of the last window read

    def position(self) -> dict:
        return {"epoch": self.epoch, "segment": self.segment, "window": self.window, "bad_shards": list(self.bad_shards)}

    def read_in_epoch(self) -> int:
        """Windows read so far in the current epoch."""
        return sum(hi - lo for _, lo, hi in self._segments(self.epoch)[: self.segment]) + self.window

    def skip_to(self, epoch: int, windows: int) -> None:
        """Move to `epoch` with its first `windows` windows (in reading order) counted as read."""
        self.epoch, self.segment, self.window = epoch, 0, windows
        for _, lo, hi in self._segments(epoch):
            if self.window < hi - lo:
                return
            self.segment, self.window = self.segment + 1, self.window - (hi - lo)

    def next_window(self) -> dict[str, np.ndarray]:
        idle = 0  # segments and epoch ends passed without a window, to stop if every shard is bad
        while True:
            segments = self._segments(self.epoch)
            if self.segment < len(segments):
                windows, order = self._load(segments[self.segment])
                if self.window < len(order):
                    self.window += 1
                    index = int(order[self.window - 1])
                    self.origin = f"{self.shards.shards[segments[self.segment][0]].url}@{windows.offset(index)}"
                    return windows[index]
                self.segment, self.window = self.segment + 1, 0
            else:
                self.epoch, self.segment, self.window = self.epoch + 1, 0, 0
            idle += 1
            if idle > 2 * len(segments) + 2:
                raise DataError(f"{self.shards.source} ({self.shards.split}): every shard given to this reader "
                                f"(data-parallel rank {self.layout.dp_rank}) is bad: re-create them with `scalelm shard`")

    def _segments(self, epoch: int) -> list[tuple[int, int, int]]:
        """(shard, first window, end window) pieces of this reader's range in `epoch`, in reading order."""
        if self._segments_of is None or self._segments_of[0] != epoch:
            order = (np.random.default_rng([self.layout.seed, epoch]).permutation(len(self.counts))
                     if self.layout.shuffle else range(len(self.counts)))
            begin, end = self.reader * self.per_reader, (self.reader + 1) * self.per_reader
            segments, offset = [], 0
            for shard in order:
                n = self.counts[shard]
                lo, hi = max(begin, offset) - offset, min(end, offset + n) - offset
                if lo < hi:
                    segments.append((int(shard), lo, hi))
                offset += n
            self._segments_of = (epoch, segments)
        return self._segments_of[1]

    def _load(self, segment: tuple[int, int, int]) -> tuple[TextWindows | ChatWindows, np.ndarray]:
        key = (self.epoch, self.segment)
        if self._loaded is None or self._loaded[0] != key:
            shard_index, lo, hi = segment
            fields, L = self._read(shard_index), self.layout.seq_len
            if self.shards.chat is not None:
                shard = self.shards.shards[shard_index]
                windows = ChatWindows(fields["tokens"], fields["flags"], shard.lengths, L, self.train_on,
                                      self.shards.pairs, fields.get("reference"), shard.classes)
            else:
                windows = TextWindows(fields["tokens"], L, self.shards.eos_id if self.document_mask else None)
            order = np.arange(lo, hi) if len(windows) else np.arange(0)
            if self.layout.shuffle:
                order = np.random.default_rng([self.layout.seed, self.epoch, shard_index, lo]).permutation(order)
            self._loaded = (key, windows, order)
        return self._loaded[1], self._loaded[2]

    def _read(self, shard_index: int) -> dict[str, np.ndarray]:
        """The shard's tokens (and flags, and reference log-probs); a bad shard under on_bad_shard=skip reads as
        empty (warned about once)."""
        fields = {"tokens": self.shards.dtype, **({"flags": np.dtype(np.uint8)} if self.shards.chat is not None else {})}
        if shard_index not in self.bad_shards:
            try:
                read = read_shard_fields(self.shards.shards[shard_index], fields)
                if self.shards.reference is not None:
                    shard = self.shards.shards[shard_index]
                    read["reference"] = load_values(self.shards.reference[shard_index], len(shard.lengths))
                return read
            except DataError as e:
                if self.on_bad_shard != "skip":
                    raise
                warnings.warn(f"skipping bad shard: {e}", stacklevel=2)
                self.bad_shards.append(shard_index)
        return {name: np.empty(0, dtype) for name, dtype in fields.items()}
