"""`scalelm shard --chat`: conversations (JSONL) -> chat shards of token ids and per-token target flags.

    SHARDS/manifest.json    as for text shards, plus `kind: chat`, the chat template's SHA-256, the longest
                            conversation allowed (--seq-len) and per split the target tokens; per shard
                            the length of every conversation
    SHARDS/train-*.tar      samples {key}.tokens (ids) and {key}.flags (one byte per token, data/chat.py)

Each conversation is rendered with the chat template (data/chat.py) exactly as `apply_chat_template`
renders it. One longer than --seq-len is cut between turns, after the last assistant turn that fits
(`--overlong truncate`, the default) or dropped (`drop`); one whose first assistant turn does not fit
is dropped either way. Every cut and drop is counted in the manifest and in what the command prints.
A conversation goes to val by a hash of its messages, so the split does not depend on order or cores.

`check_fits` is the reading side's check that a chat shard set fits a run (template, lengths, targets).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from scalelm.data.chat import ASSISTANT, LAST, TEMPLATE_SHA256, ChatEncoder
from scalelm.data.conversations import conversation_files, read_conversations
from scalelm.data.files import sha256_file
from scalelm.data.packing import TRAIN_ON
from scalelm.data.shards import SPLITS, ShardSet, ShardSetWriter, is_val, token_dtype
from scalelm.data.tokenizer import load_tokenizer
from scalelm.data.workers import default_workers, imap_ordered
from scalelm.errors import DataError

BATCH = 2048  # conversations per job sent to a worker


def write_chat_shards(inputs: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *, seq_len: int = 2048,
                      overlong: str = "truncate", shard_size: int = 256 << 20, val_fraction: float = 0.01,
                      workers: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Encode the conversations in `inputs` into chat shards under `out`; returns the manifest."""
    if overlong not in ("truncate", "drop"):
        raise DataError(f"--overlong {overlong}: use truncate or drop")
    files, dtype, writer = chat_writer(inputs, tokenizer, out, seq_len, val_fraction, shard_size, overwrite)
    counts = {split: {"conversations": 0, "truncated": 0, "dropped_overlong": 0, "assistant": 0, "last": 0}
              for split in SPLITS}
    jobs = ((batch, seq_len, overlong, val_fraction, dtype.str) for batch in _batches(read_conversations(files)))
    with tqdm(desc="shard --chat", unit=" conv", unit_scale=True, disable=not progress, mininterval=1.0) as bar:
        for parts in imap_ordered(_encode_batch, jobs, workers or default_workers(), init_encoder, (str(tokenizer),)):
            for split, (tokens, flags, lengths, found) in parts.items():
                writer.write(split, tokens, len(lengths), flags, lengths)
                for key, value in found.items():
                    counts[split][key] += value
                bar.update(found["conversations"] + found["dropped_overlong"])
    if writer.documents == 0:
        dropped = sum(c["dropped_overlong"] for c in counts.values())
        raise DataError(f"no conversation in {', '.join(map(str, inputs))} fits --seq-len {seq_len}"
                        + (f" ({dropped} were longer)" if dropped else "") + ": raise --seq-len")
    splits = {split: {"conversations": c["conversations"], "truncated": c["truncated"],
                      "dropped_overlong": c["dropped_overlong"], "targets": {"assistant": c["assistant"], "last": c["last"]}}
              for split, c in counts.items()}
    chat = {"template_sha256": TEMPLATE_SHA256, "seq_len": seq_len, "overlong": overlong}
    return writer.close(splits, kind="chat", chat=chat, val_fraction=val_fraction, inputs=[str(p) for p in inputs])


def chat_writer(inputs: Sequence[str | Path], tokenizer: str | Path, out: str | Path, seq_len: int, val_fraction: float,
                shard_size: int, overwrite: bool) -> tuple[list[Path], np.dtype, ShardSetWriter]:
    """The arguments of a chat-template shard set checked (`scalelm shard --chat` and `--preference`), and its
    (input files, token dtype, writer)."""
    if seq_len < 8:
        raise DataError(f"--seq-len {seq_len}: use the run's train.seq_len (at least 8)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    sp = load_tokenizer(tokenizer)
    ChatEncoder(sp)  # the tokenizer must have the chat markers: say so before reading anything
    files = conversation_files(inputs)
    dtype = token_dtype(sp.vocab_size())
    writer = ShardSetWriter(Path(out), dtype=dtype, vocab_size=sp.vocab_size(), eos_id=sp.eos_id(),
                            tokenizer={"file": str(tokenizer), "sha256": sha256_file(tokenizer)},
                            shard_size=shard_size, overwrite=overwrite)
    return files, dtype, writer


def check_fits(sets: list[ShardSet], seq_len: int, train_on: str) -> bool:
    """Whether the sources are chat shards (all or none), each fit for this run; raises DataError if not."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}: use one of {', '.join(TRAIN_ON)}")
    for s in sets:
        if s.prompts:
            raise DataError(f"{s.source} holds prompts (`scalelm shard --prompts`), which an RL run samples completions "
                            f"of, not windows of tokens to train or evaluate on: give text, chat or preference shards")
    kinds = {s.chat is not None for s in sets}
    if len(kinds) > 1:
        raise DataError("chat shards and text shards cannot be blended: train on one kind at a time")
    if len({s.pairs for s in sets}) > 1:
        raise DataError("preference shards and chat shards cannot be blended: train on one kind at a time")
    if len({s.labels is not None for s in sets}) > 1:
        raise DataError("labelled texts and conversations cannot be blended: train on one kind at a time")
    for s in sets:
        if s.chat is None:
            continue
        where = f"{s.source} ({s.split})"
        if s.labels is None and s.chat["template_sha256"] != TEMPLATE_SHA256:
            raise DataError(f"{where} was made with another chat template than this scalelm's: re-create it with "
                            f"`scalelm shard --chat`")
        sizes = [a + b for shard in s.shards for a, b in zip(shard.lengths[0::2], shard.lengths[1::2])] if s.pairs \
            else [n for shard in s.shards for n in shard.lengths]  # a pair's two sides share a window
        longest = max(sizes, default=0)
        if longest > seq_len:
            what = "preference pairs" if s.pairs else "texts" if s.labels is not None else "conversations"
            raise DataError(f"{where} holds {what} of up to {longest} tokens, longer than train.seq_len={seq_len}: "
                            f"re-shard with --seq-len {seq_len} or raise train.seq_len")
        if s.labels is not None:  # labelled texts: no template, no token targets
            continue
        targets = s.chat["targets"]["last" if train_on == "last" else "assistant"] if train_on != "all" else s.tokens
        if s.tokens and targets == 0:
            raise DataError(f"{where}: no token is a target under finetune.train_on={train_on}: the masks are all "
                            f"zeros; re-create the shards with `scalelm shard --chat`")
        if train_on == "assistant" and targets >= s.tokens > 0:
            raise DataError(f"{where}: every token is marked an assistant target, so the masks mean nothing: "
                            f"re-create the shards with `scalelm shard --chat`")
    return kinds == {True}


def _batches(conversations):
    batch = []
    for _, messages in conversations:  # read (and checked) here, so an error names its file and line
        batch.append(messages)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


_worker_encoder: ChatEncoder | None = None


def init_encoder(tokenizer: str) -> None:
    """A pool worker's initializer: its chat encoder, loaded once (also `scalelm shard --preference`'s)."""
    global _worker_encoder  # NOTE: per-process encoder of a pool worker
    _worker_encoder = ChatEncoder(load_tokenizer(tokenizer))


def encoder() -> ChatEncoder:
    """The encoder `init_encoder` loaded in this worker."""
    return _worker_encoder


def _encode_batch(args) -> dict[str, tuple[np.ndarray, np.ndarray, list[int], dict]]:
    """Worker: each split's conversations as (tokens, flags, lengths, counts)."""
    batch, seq_len, overlong, val_fraction, dtype = args
    out = {split: ([], [], [], {"conversations": 0, "truncated": 0, "dropped_overlong": 0, "assistant": 0, "last": 0})
           for split in SPLITS}
    for messages in batch:
        split = "val" if is_val(json.dumps(messages, sort_keys=True), val_fraction) else "train"
        tokens, flags, lengths, found = out[split]
        whole = _worker_encoder.encode(messages)
        encoded = whole if len(whole[0]) <= seq_len else _worker_encoder.encode(messages, seq_len) \
            if overlong == "truncate" else None
        if encoded is None:
            found["dropped_overlong"] += 1
            continue
        found["truncated"] += encoded is not whole
        ids, flag = encoded
        tokens.append(ids.astype(dtype))
        flags.append(flag)
        lengths.append(len(ids))
        found["conversations"] += 1
        found["assistant"] += int(np.count_nonzero(flag & ASSISTANT))
        found["last"] += int(np.count_nonzero(flag & LAST))
    return {split: (np.concatenate(t) if t else np.empty(0, dtype), np.concatenate(f) if f else np.empty(0, np.uint8),
                    lengths, found) for split, (t, f, lengths, found) in out.items()}
