"""`scalelm shard --preference`: preference pairs (JSONL) -> preference shards, each pair two documents.

    SHARDS/manifest.json    as for chat shards (`kind: preference`, `chat.pairs: true`), and per split the
                            pairs kept and those dropped, by reason
    SHARDS/train-*.tar      {key}.tokens and {key}.flags as in chat shards: a pair is its chosen side (prompt +
                            chosen reply) then its rejected side (prompt + rejected reply), so the manifest's
                            lengths run chosen, rejected, chosen, rejected, ...

Each side is the prompt and its reply rendered with the one chat template (data/chat.py); the reply's
assistant tokens are its targets, the prompt's none. The loader packs whole pairs into windows
(data/packing.py), where the two sides are two documents that do not see each other.

Pairs are dropped and counted, never quietly: a reply with no text, two identical replies, and a pair whose
two sides together are longer than --seq-len (both must fit one window). If every pair is dropped, nothing
is written and the command says why. A pair goes to val by a hash of its messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from scalelm.data.chat import ASSISTANT, TEMPLATE_SHA256
from scalelm.data.chat_shards import chat_writer, encoder, init_encoder
from scalelm.data.preferences import read_pairs
from scalelm.data.shards import SPLITS, is_val
from scalelm.data.workers import default_workers, imap_ordered
from scalelm.errors import DataError

BATCH = 2048  # pairs per job sent to a worker
DROPS = ("dropped_empty", "dropped_identical", "dropped_overlong")


def write_preference_shards(inputs: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *, seq_len: int = 2048,
                            shard_size: int = 256 << 20, val_fraction: float = 0.01, workers: int | None = None,
                            overwrite: bool = False, progress: bool = True) -> dict:
    """Encode the preference pairs in `inputs` into preference shards under `out`; returns the manifest."""
    files, dtype, writer = chat_writer(inputs, tokenizer, out, seq_len, val_fraction, shard_size, overwrite)
    counts = {split: dict.fromkeys(("pairs", "targets", *DROPS), 0) for split in SPLITS}
    empty = {"empty": 0, "identical": 0}  # dropped before a split is known (a flawed pair is not hashed)
    jobs = ((batch, seq_len, val_fraction, dtype.str) for batch in _batches(read_pairs(files), empty))
    with tqdm(desc="shard --preference", unit=" pair", unit_scale=True, disable=not progress, mininterval=1.0) as bar:
        for parts in imap_ordered(_encode_batch, jobs, workers or default_workers(), init_encoder, (str(tokenizer),)):
            for split, (tokens, flags, lengths, found) in parts.items():
                writer.write(split, tokens, len(lengths), flags, lengths)
                for key, value in found.items():
                    counts[split][key] += value
                bar.update(found["pairs"] + found["dropped_overlong"])
    counts["train"]["dropped_empty"], counts["train"]["dropped_identical"] = empty["empty"], empty["identical"]
    if writer.documents == 0:
        drops = {k: sum(c[k] for c in counts.values()) for k in DROPS}
        raise DataError(f"no preference pair in {', '.join(map(str, inputs))} can be trained on: "
                        f"{drops['dropped_empty']} have an empty reply, {drops['dropped_identical']} two identical ones "
                        f"and {drops['dropped_overlong']} are longer than --seq-len {seq_len} (both sides together)")
    splits = {split: {"pairs": c["pairs"], "conversations": 2 * c["pairs"], "truncated": 0,
                      **{k: c[k] for k in DROPS}, "targets": {"assistant": c["targets"], "last": c["targets"]}}
              for split, c in counts.items()}
    chat = {"template_sha256": TEMPLATE_SHA256, "seq_len": seq_len, "overlong": "drop", "pairs": True}
    return writer.close(splits, kind="preference", chat=chat, val_fraction=val_fraction, inputs=[str(p) for p in inputs])


def _batches(pairs, dropped: dict):
    batch = []
    for _, pair, flaw in pairs:  # read (and checked) here, so an error names its file and line
        if pair is None:
            dropped[flaw] += 1
            continue
        batch.append(pair)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_batch(args) -> dict[str, tuple[np.ndarray, np.ndarray, list[int], dict]]:
    """Worker: each split's pairs as (tokens, flags, lengths: chosen, rejected, ..., counts)."""
    batch, seq_len, val_fraction, dtype = args
    out = {split: ([], [], [], {"pairs": 0, "targets": 0, "dropped_overlong": 0}) for split in SPLITS}
    for prompt, chosen, rejected in batch:
        split = "val" if is_val(json.dumps([prompt, chosen, rejected], sort_keys=True), val_fraction) else "train"
        tokens, flags, lengths, found = out[split]
        sides = [encoder().encode_reply(prompt, reply) for reply in (chosen, rejected)]
        if sum(len(ids) for ids, _ in sides) > seq_len:
            found["dropped_overlong"] += 1
            continue
        for ids, flag in sides:
            tokens.append(ids.astype(dtype))
            flags.append(flag)
            lengths.append(len(ids))
            found["targets"] += int(np.count_nonzero(flag & ASSISTANT))
        found["pairs"] += 1
    return {split: (np.concatenate(t) if t else np.empty(0, dtype), np.concatenate(f) if f else np.empty(0, np.uint8),
                    lengths, found) for split, (t, f, lengths, found) in out.items()}
