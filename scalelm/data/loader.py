"""Packed, data-parallel-sharded, blended and exactly resumable batches from token shards.

How a batch is made
-------------------
Each shard's tokens form one stream cut into windows of seq_len + 1 tokens with stride seq_len
(window i = tokens[i*L : i*L + L + 1]), so every token but a shard's first is a target exactly
once (a shard's last < L tokens are not), and documents run into each other separated by the EOS
the shard writer put after each one.

Who reads what
--------------
A *reader* is one loader worker of one data-parallel rank: reader = dp_rank * W + worker, and there
are R = dp_size * W of them. Each epoch the shards are shuffled with (seed, epoch) and laid end to
end; the resulting sequence of N windows is cut into R equal ranges of q = N // R windows and reader
r reads range r (the last N - qR windows sit the epoch out; the next shuffle picks others). Every
reader thus reads the same number of windows per epoch, so ranks and workers, which all draw at the
same rate, move through epochs in lockstep: in one epoch every window is read exactly once, by one
reader. A range covers a few whole shards and at most two partial ones; a reader reads its range
shard by shard (a *segment*), windows shuffled within the segment with (seed, epoch, shard, start).

Chat shards (data/chat_shards.py) are read the same way, their windows being packed runs of whole
conversations instead of fixed strides (data/packing.py): the batch then also carries loss_mask,
position_ids and document_ids, as it does for text shards under `document_mask`. Preference shards
(data/preference_shards.py) pack whole pairs, and with `reference` each window also carries its documents'
reference log-probs, read beside the shards (data/reference.py).

Several datasets are blended per window by the deficit rule: the next window comes from the
source furthest behind its weight (argmax_i w_i * (n + 1) - count_i), which is deterministic and
needs nothing but the counts as state.

Resuming
--------
A reader's whole state is, per source, (epoch, segment, window, bad shards) plus the blend counts.
Every batch carries the state its worker reached after making it; the loader keeps the newest one
per worker from the batches it actually handed out, so `state_dict()` describes exactly what was
consumed, whatever the workers had prefetched. torch's DataLoader takes batches from its workers
round-robin starting at worker 0; after k batches the next batch is due from logical worker k % W,
so a resumed loader maps physical worker w to logical worker (w + k) % W.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from scalelm import compat
from scalelm.batch import Batch
from scalelm.config import Config
from scalelm.data.chat_shards import check_fits
from scalelm.data.files import sha256_file
from scalelm.data.reference import with_reference
from scalelm.data.shards import read_manifest
from scalelm.data.window_stream import Layout, ReaderDataset, WindowStream, window_counts
from scalelm.data.workers import WORKERS
from scalelm.errors import DataError

STATE_VERSION = 2


class TokenLoader:
    """Iterate micro-batches `{"input_ids": (B, L) int64, "labels": (B, L) int64, "origin": [B x "SHARD@OFFSET"]}`
    forever (origin: where each sequence starts, the shard and the token offset in it). With packed
    documents (chat shards, or `document_mask`) also "loss_mask" (B, L) bool, "position_ids" and
    "document_ids" (B, L) int64; `train_on` picks a chat's targets (assistant, all or last).

    Iterating again continues where the last iteration stopped; `state_dict()` / `load_state_dict()`
    carry that position across processes, so a resumed run sees exactly the batches it would have.
    """

    def __init__(self, sources: Sequence[str | Path], *, split: str, seq_len: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0, seed: int = 0,
                 weights: Sequence[float] = (), shuffle: bool = True, tokenizer_sha256: str | None = None,
                 on_bad_shard: str = "error", document_mask: bool = False, train_on: str = "assistant",
                 reference: str | None = None):
        if seq_len < 1 or micro_batch_size < 1 or num_workers < 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad loader shape: seq_len={seq_len}, micro_batch_size={micro_batch_size}, "
                             f"num_workers={num_workers}, dp_rank={dp_rank}, dp_size={dp_size}")
        if on_bad_shard not in ("error", "skip"):
            raise ValueError(f"on_bad_shard={on_bad_shard!r}: use 'error' or 'skip'")
        if not sources:
            raise DataError(f"no {split} data: set data.train to a directory written by `scalelm shard`")
        sources = [_normalise(s) for s in sources]
        self.sets = [read_manifest(s, split, tokenizer_sha256) for s in sources]
        self.reference = reference  # the SHA-256 of the model whose log-probs the batches carry
        if reference is not None:
            self.sets = [with_reference(s, reference) if s.pairs else s for s in self.sets]
        first = self.sets[0]
        for other in self.sets[1:]:
            if other.tokenizer_sha256 != first.tokenizer_sha256:
                raise DataError(f"{other.source} and {first.source} were made with different tokenizers: "
                                f"blend only shard sets made with the same one")
        self.chat = check_fits(self.sets, seq_len, train_on)
        self.documents = self.chat or document_mask  # the batches carry position_ids and document_ids
        self.document_mask, self.train_on = document_mask, train_on
        if weights and (len(weights) != len(self.sets) or min(weights) <= 0):
            raise DataError(f"blending weights {list(weights)} for {len(self.sets)} sources: give one positive weight each")
        weights = weights or [s.tokens for s in self.sets]
        self.layout = Layout(tuple(sources), split, tuple(w / sum(weights) for w in weights), seq_len,
                             micro_batch_size, dp_rank, dp_size, num_workers, seed, shuffle)
        readers = dp_size * self.layout.workers
        for s in self.sets:
            windows = sum(window_counts(s, seq_len))
            if windows < readers:
                raise DataError(
                    f"{s.source} ({split}) holds {windows} windows of train.seq_len + 1 = {seq_len + 1} tokens, fewer "
                    f"than its {readers} readers (data-parallel ranks x loader workers): add data, shorten the "
                    f"sequences or use fewer workers")
        self.on_bad_shard = on_bad_shard
        self._batches = 0
        self._states: list[dict | None] = [None] * self.layout.workers

    def windows(self) -> int:
        """The windows the sources hold (sequences of seq_len + 1 tokens, or packed conversations): one epoch,
        over all readers."""
        return sum(sum(window_counts(s, self.layout.seq_len)) for s in self.sets)

    def packing(self) -> str | None:
        """For chat shards (conversations, preference pairs, labelled texts), how they pack into windows, for the
        run's log."""
        if not self.chat:
            return None
        documents = sum(len(shard.lengths) for s in self.sets for shard in s.shards)
        windows, tokens = self.windows(), sum(s.tokens for s in self.sets)
        truncated = sum(s.chat.get("truncated", 0) for s in self.sets)
        first = self.sets[0]
        what, count, cut = (("pairs", documents // 2, "") if first.pairs else
                            ("texts", documents, f"; {truncated:,} were truncated when sharded") if first.labels is not None
                            else ("conversations", documents, f"; {truncated:,} were cut between turns when sharded"))
        return (f"packed {count:,} {what} into {windows:,} windows of {self.layout.seq_len} tokens "
                f"({100 * tokens / max(windows * self.layout.seq_len, 1):.1f}% real tokens, the rest tail padding{cut})")

    def __iter__(self) -> Iterator[Batch]:
        dataset = ReaderDataset(self.sets, self.layout, self.on_bad_shard, list(self._states),
                                 offset=self._batches % self.layout.workers, document_mask=self.document_mask,
                                 train_on=self.train_on)
        if self.layout.num_workers == 0:
            batches = iter(dataset)
        else:
            # its own generator: by default a DataLoader draws its workers' base seed from torch's global RNG,
            # which would shift the dropout streams of a resumed run. Workers start from a forkserver (workers.py)
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.layout.num_workers,
                                      prefetch_factor=4, persistent_workers=False, generator=torch.Generator(),
                                      multiprocessing_context=WORKERS))
        while True:
            try:
                item = next(batches)
            except DataError as e:
                # NOTE: a worker's exception arrives with the worker's traceback pasted into its message;
                # the person needs only the last line, which is the original message.
                message = str(e).strip().splitlines()[-1].removeprefix("scalelm.errors.DataError: ")
            else:
                self._states[item["worker"]] = item["state"]
                self._batches += 1
                yield {k: v for k, v in item.items() if k not in ("worker", "state")}
                continue
            compat.shutdown_workers(batches)  # now, not when the garbage collector gets to them
            raise DataError(message)

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

    def continue_from(self, states: Sequence[dict | None]) -> str:
        """Continue from states saved under another data-parallel size or worker count (one per saved
        data-parallel rank); returns what happened, for the log.

        The saved readers moved in lockstep, so each had read the same share of its range of the
        epoch; every reader here skips that share of its own range. As many windows are read per
        epoch as before, though not the same ones. With other data, sequence length or seed, the
        loader starts at the beginning."""
        saved = next((s for s in states if s), None)
        if saved is None or saved.get("version") != STATE_VERSION:
            return "the loader starts at the beginning (no usable saved state)"
        old = Layout(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["layout"].items()})
        same_data = ("sources", "split", "seq_len", "seed", "shuffle")
        if any(getattr(old, k) != getattr(self.layout, k) for k in same_data):
            return "the loader starts at the beginning (the data, sequence length or seed changed)"
        # (epoch, share read) per source, the least advanced saved reader's
        progress = []
        for i, shards in enumerate(self.sets):
            least = None
            for dp_rank, state in enumerate(states):
                for worker, wstate in enumerate((state or {}).get("workers", [])):
                    if wstate is None:
                        continue
                    reader = WindowStream(shards, dp_rank * old.workers + worker, old.dp_size * old.workers,
                                           old, self.on_bad_shard, wstate["streams"][i])
                    here = (reader.epoch, reader.read_in_epoch() / reader.per_reader)
                    least = here if least is None else min(least, here)
            progress.append(least or (0, 0.0))
        self._states = []
        for worker in range(self.layout.workers):
            streams = []
            for shards, (epoch, share) in zip(self.sets, progress):
                reader = WindowStream(shards, self.layout.dp_rank * self.layout.workers + worker,
                                       self.layout.dp_size * self.layout.workers, self.layout, self.on_bad_shard, None)
                reader.skip_to(epoch, round(share * reader.per_reader))
                streams.append(reader.position())
            self._states.append({"streams": streams, "counts": [0] * len(self.sets)})
        self._batches = 0
        epochs = ", ".join(f"epoch {e} at {100 * share:.1f}%" for e, share in progress)
        return f"the loader continues where the saved one was ({epochs}), with other windows than before"


def loader_from_config(cfg: Config, split: str = "train", dp_rank: int = 0, dp_size: int = 1,
                       reference: str | None = None) -> TokenLoader:
    """The train loader (shuffled) or the val loader (fixed order, data.val or else data.train's val split); with
    `reference`, the SHA-256 of the model whose scored log-probs the preference batches carry."""
    sources = cfg.data.train if split == "train" else (cfg.data.val or cfg.data.train)
    tokenizer_sha = None
    if cfg.data.tokenizer:
        if not Path(cfg.data.tokenizer).is_file():
            raise DataError(f"data.tokenizer={cfg.data.tokenizer} not found: point it at the .model the shards were made with")
        tokenizer_sha = sha256_file(cfg.data.tokenizer)
    return TokenLoader(sources, split=split, seq_len=cfg.train.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                       dp_rank=dp_rank, dp_size=dp_size, num_workers=cfg.data.num_workers if split == "train" else 0,
                       seed=cfg.data.seed, weights=cfg.data.weights if split == "train" else (),
                       shuffle=split == "train", tokenizer_sha256=tokenizer_sha, on_bad_shard=cfg.data.on_bad_shard,
                       document_mask=cfg.data.document_mask, train_on=cfg.finetune.train_on, reference=reference)


def _normalise(source: str | Path) -> str:
    """One spelling per source ('shards/' and 'shards' are the same), so saved states compare equal."""
    source = str(source)
    return source.rstrip("/") if "://" in source or source.startswith("pipe:") else str(Path(source))


def _layout_dict(layout: Layout) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in layout.__dict__.items()}
