"""`scalelm shard --prompts`: prompts (JSONL) -> prompt shards, what an RL run samples completions of.

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   chat: ids are the template's
    {"prompt": [{"role": ..., "content": ...}, ...]}                                     prompt, up to the assistant's
                                                                                         header (TRL's form too)
    {"prompt": "..."}                                                                    plain text: BOS, then the text
    ... , "answer": "42", "metadata": {...}                                              optional, for the reward

ShareGPT turns ({from, value}, also under "conversations") and a top-level "system" string (the first message of
a chat prompt) are read as for conversations (data/conversations.py). The last message must not be the assistant's:
the model writes that. An answer may be a string or a number (kept as a string); metadata a JSON object.

    SHARDS/manifest.json    as for text shards, with `kind: prompts`, a `chat` entry (`prompts: true`, the chat
                            template's SHA-256 if any prompt is a chat), per split the prompts, the longest (in
                            ids) and those with an answer, and per shard each prompt's length
    SHARDS/train-*.tar      per chunk of prompts {key}.tokens (their ids back to back) and {key}.json (a list,
                            per prompt: {"prompt", "answer", "metadata", "length"})

A record that is no prompt stops the command with one line naming the file and line. A prompt goes to val by a
hash of its record, so the split does not depend on order. data/prompts.py reads the shards back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from scalelm.data.chat import TEMPLATE_SHA256, ChatEncoder
from scalelm.data.conversations import conversation_files, to_turn
from scalelm.data.files import sha256_file
from scalelm.data.readers import jsonl_records, without_surrogates
from scalelm.data.shards import SPLITS, ShardSetWriter, is_val, token_dtype
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import DataError

BATCH = 1024  # prompts per chunk (one sample per split)
FORMS = ('{"messages": [{role, content}, ...]} or {"prompt": "text"} (or a list of messages), with an optional '
         '"answer" (string or number) and "metadata" (an object)')


def write_prompt_shards(inputs: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *,
                        shard_size: int = 256 << 20, val_fraction: float = 0.01, overwrite: bool = False,
                        progress: bool = True) -> dict:
    """Encode the prompts in `inputs` into prompt shards under `out`; returns the manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    sp = load_tokenizer(tokenizer)
    try:
        chat = ChatEncoder(sp)
    except ValueError as e:
        chat, no_chat = None, str(e)
    files = conversation_files(inputs)
    dtype = token_dtype(sp.vocab_size())
    writer = ShardSetWriter(Path(out), dtype=dtype, vocab_size=sp.vocab_size(), eos_id=sp.eos_id(),
                            tokenizer={"file": str(tokenizer), "sha256": sha256_file(tokenizer)},
                            shard_size=shard_size, overwrite=overwrite)
    counts = {split: {"prompts": 0, "longest": 0, "with_answer": 0} for split in SPLITS}
    any_chat = False
    with tqdm(desc="shard --prompts", unit=" prompt", unit_scale=True, disable=not progress, mininterval=1.0) as bar:
        for batch in _batches(read_prompts(files)):
            parts = {split: ([], []) for split in SPLITS}  # per split: ids, records
            for where, text, entry in batch:
                if isinstance(entry["prompt"], list) and chat is None:
                    raise DataError(f"{where}: a chat prompt, and {no_chat}")
                any_chat |= isinstance(entry["prompt"], list)
                ids = chat.prompt(entry["prompt"]) if isinstance(entry["prompt"], list) \
                    else [sp.bos_id(), *sp.encode(entry["prompt"])]
                split = "val" if is_val(text, val_fraction) else "train"
                parts[split][0].append(np.asarray(ids, dtype))
                parts[split][1].append({**entry, "length": len(ids)})
                c = counts[split]
                c["prompts"] += 1
                c["longest"] = max(c["longest"], len(ids))
                c["with_answer"] += entry["answer"] is not None
            for split, (ids, records) in parts.items():
                if records:
                    lengths = [r["length"] for r in records]
                    writer.write(split, np.concatenate(ids), len(records), lengths=lengths, records=records)
            bar.update(len(batch))
    if writer.documents == 0:
        raise DataError(f"no prompts in {', '.join(map(str, inputs))}: write one per line, {FORMS}")
    chat_entry = {"prompts": True, "template_sha256": TEMPLATE_SHA256 if any_chat else None, "seq_len": None}
    return writer.close(counts, kind="prompts", chat=chat_entry, val_fraction=val_fraction,
                        inputs=[str(p) for p in inputs])


def read_prompts(files: Sequence[Path]) -> Iterator[tuple[str, str, dict]]:
    """("FILE:LINE", the record's JSON text, {"prompt", "answer", "metadata"}) for every record, in file order,
    checked; the prompt is a text or a list of {role, content}."""
    for path in files:
        for lineno, record, _ in jsonl_records(path):
            where = f"{path}:{lineno}"
            yield where, json.dumps(record, sort_keys=True), to_prompt(record, where)


def to_prompt(record: dict, where: str) -> dict:
    """The record as {"prompt": text or messages, "answer": str | None, "metadata": dict}, checked."""
    key = next((k for k in ("messages", "conversations", "prompt") if k in record), None)
    turns = record.get(key)
    if key != "prompt" and key is not None and not isinstance(turns, list):
        raise DataError(f"{where}: {key} is not a list of turns: use {FORMS}")
    if isinstance(turns, list):
        prompt = [to_turn(t, where, i) for i, t in enumerate(turns)]
        if "system" in record:
            system = record["system"]
            if not isinstance(system, str):
                raise DataError(f"{where}: 'system' is not text")
            prompt.insert(0, {"role": "system", "content": without_surrogates(system)[0]})
        for i, m in enumerate(prompt):
            if not m["content"].strip():
                raise DataError(f"{where}: message {i + 1} ({m['role']}) is empty: give it text or remove it")
        if not prompt:
            raise DataError(f"{where}: the prompt has no messages: use {FORMS}")
        if prompt[-1]["role"] == "assistant":
            raise DataError(f"{where}: the prompt ends with an assistant turn, which the model is to write: end it with "
                            f"a user (or system) turn")
    elif isinstance(turns, str) and turns.strip():
        if "system" in record:
            raise DataError(f"{where}: a 'system' message goes with a chat prompt: give \"messages\" instead of "
                            f"\"prompt\" text")
        prompt = without_surrogates(turns)[0]
    else:
        what = "empty" if isinstance(turns, str) else f"a {type(turns).__name__}" if turns is not None \
            else f"missing (keys {', '.join(sorted(record)) or 'none'})"
        raise DataError(f"{where}: the prompt is {what}: use {FORMS}")
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
        raise DataError(f"{where}: 'answer' is a {type(answer).__name__}: give a string or a number")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise DataError(f"{where}: 'metadata' is a {type(metadata).__name__}: give a JSON object ({{\"key\": value}})")
    return {"prompt": prompt, "answer": None if answer is None else without_surrogates(str(answer))[0],
            "metadata": metadata}


def _batches(prompts: Iterator[tuple[str, str, dict]]) -> Iterator[list[tuple[str, str, dict]]]:
    batch = []
    for item in prompts:
        batch.append(item)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
