"""`scalelm shard --labels`: labelled texts (JSONL `text` + `label`) -> shards for a classification head.

    {"text": "...", "label": 2}            a class id, 0 or more
    {"text": "...", "label": "comedy"}     or a class name; names are numbered in sorted order

    SHARDS/manifest.json    as for chat shards (`kind: labelled`), with `chat.labels`: the class names by id, and
                            per shard each text's length and class (`classes`)
    SHARDS/train-*.tar      {key}.tokens (BOS, then the text) and {key}.flags (zeros: a classifier has no token targets)

A text longer than --seq-len keeps its first --seq-len tokens (counted as truncated). The loader packs texts
into windows like conversations, each on its own; the head reads each one's last token (objectives/classify.py). A
record without text or label, or with a negative or fractional label, stops the command with one line naming
the file and line. A text goes to val by a hash of its text and label.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from scalelm.data.conversations import conversation_files
from scalelm.data.files import sha256_file
from scalelm.data.readers import jsonl_records, without_surrogates
from scalelm.data.shards import SPLITS, ShardSetWriter, is_val, token_dtype
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import DataError

BATCH = 4096  # texts encoded at a time


def write_labelled_shards(inputs: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *, seq_len: int = 2048,
                          shard_size: int = 256 << 20, val_fraction: float = 0.01, overwrite: bool = False,
                          progress: bool = True) -> dict:
    """Encode the labelled texts in `inputs` into shards under `out`; returns the manifest."""
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len}: use the run's train.seq_len")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    sp = load_tokenizer(tokenizer)
    files = conversation_files(inputs)
    records = list(read_labelled(files))  # labels are numbered over the whole input, so read it first
    if not records:
        raise DataError(f"no labelled text in {', '.join(map(str, inputs))}")
    names = label_names([label for _, _, label in records])
    ids = {name: i for i, name in enumerate(names)}
    dtype = token_dtype(sp.vocab_size())
    writer = ShardSetWriter(Path(out), dtype=dtype, vocab_size=sp.vocab_size(), eos_id=sp.eos_id(),
                            tokenizer={"file": str(tokenizer), "sha256": sha256_file(tokenizer)},
                            shard_size=shard_size, overwrite=overwrite)
    counts = {split: {"texts": 0, "truncated": 0, "per_class": [0] * len(names)} for split in SPLITS}
    for start in tqdm(range(0, len(records), BATCH), desc="shard --labels", unit=" batch", disable=not progress):
        batch = records[start:start + BATCH]
        encoded = sp.encode([text for _, text, _ in batch])
        parts = {split: ([], [], []) for split in SPLITS}
        for (_, text, label), ids_ in zip(batch, encoded):
            split = "val" if is_val(json.dumps([text, label]), val_fraction) else "train"
            tokens = np.asarray([sp.bos_id(), *ids_], np.int64)
            c = counts[split]
            c["truncated"] += len(tokens) > seq_len
            tokens = tokens[:seq_len].astype(dtype)
            parts[split][0].append(tokens)
            parts[split][1].append(len(tokens))
            parts[split][2].append(ids[str(label)])
            c["texts"] += 1
            c["per_class"][ids[str(label)]] += 1
        for split, (tokens, lengths, classes) in parts.items():
            if tokens:
                flat = np.concatenate(tokens)
                writer.write(split, flat, len(lengths), np.zeros(flat.size, np.uint8), lengths, classes)
    splits = {split: {"texts": c["texts"], "conversations": c["texts"], "truncated": c["truncated"], "dropped_overlong": 0,
                      "per_class": c["per_class"], "targets": {"assistant": 0, "last": 0}} for split, c in counts.items()}
    chat = {"template_sha256": None, "seq_len": seq_len, "overlong": "truncate", "labels": names}
    return writer.close(splits, kind="labelled", chat=chat, val_fraction=val_fraction, inputs=[str(p) for p in inputs])


def read_labelled(files: Sequence[Path]) -> Iterator[tuple[str, str, int | str]]:
    """("FILE:LINE", text, label) for every record, in file order, checked."""
    for path in files:
        for lineno, record, _ in jsonl_records(path):
            where = f"{path}:{lineno}"
            text, label = record.get("text"), record.get("label")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: no 'text' (a labelled text is {{\"text\": \"...\", \"label\": 0}})")
            if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, int) and label < 0):
                raise DataError(f"{where}: 'label' is {label!r}: give a class id (0, 1, ...) or a class name")
            yield where, without_surrogates(text)[0], label


def label_names(labels: Sequence[int | str]) -> list[str]:
    """The class names by id: for integer labels "0" .. "max" (ids kept), for names their sorted order."""
    if all(isinstance(label, int) for label in labels):
        return [str(i) for i in range(max(labels) + 1)]
    if any(isinstance(label, int) for label in labels):
        raise DataError("labels mix class ids and class names: use one or the other throughout")
    return sorted(set(labels))
