"""Conversations out of JSONL files, in the forms users have them, as lists of {role, content} messages.

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   chat (OpenAI, TRL)
    {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}     ShareGPT (also under "messages")
    {"instruction": "...", "input": "...", "output": "..."}                            Alpaca (input may be empty)
    {"prompt": "...", "completion": "..."}                                              prompt / completion

A top-level "system" string becomes the first message. Files are .jsonl, plain or .gz / .zst. A record
that cannot be a conversation (bad JSON, an unknown role, an empty message, no assistant turn) stops
the read with one line naming the file, the line and the fix: nothing is dropped quietly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from scalelm.data.chat import ROLES
from scalelm.data.readers import jsonl_records, list_input_files, split_suffix, without_surrogates
from scalelm.errors import DataError

# ShareGPT's speaker names for scalelm's roles
ALIASES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
FORMS = "messages: [{role, content}], conversations: [{from, value}], instruction/input/output, or prompt/completion"


def conversation_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The .jsonl files (plain, .gz, .zst) among `inputs`, directories searched recursively."""
    files = [f for f in list_input_files(inputs) if split_suffix(f)[0] == ".jsonl"]
    if not files:
        raise DataError(f"no .jsonl files in {', '.join(map(str, inputs))}: conversations are JSONL, one per line")
    return files


def read_conversations(files: Sequence[Path]) -> Iterator[tuple[str, list[dict]]]:
    """("FILE:LINE", messages) for every conversation, in file order, streaming."""
    for path in files:
        for lineno, record, _ in jsonl_records(path):
            where = f"{path}:{lineno}"
            yield where, to_messages(record, where)


def to_messages(record: dict, where: str) -> list[dict]:
    """The record's conversation as [{role, content}], checked."""
    if "messages" in record or "conversations" in record:
        turns = record.get("messages", record.get("conversations"))
        if not isinstance(turns, list):
            raise DataError(f"{where}: {'messages' if 'messages' in record else 'conversations'} is not a list of turns")
        messages = [to_turn(t, where, i) for i, t in enumerate(turns)]
    elif "instruction" in record and "output" in record:
        instruction, extra = _text(record, "instruction", where), _text(record, "input", where, optional=True)
        messages = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")},
                    {"role": "assistant", "content": _text(record, "output", where)}]
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": _text(record, "prompt", where)},
                    {"role": "assistant", "content": _text(record, "completion", where)}]
    else:
        raise DataError(f"{where}: not a conversation (keys {', '.join(sorted(record)) or 'none'}): use {FORMS}")
    if "system" in record:
        messages.insert(0, {"role": "system", "content": _text(record, "system", where)})
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise DataError(f"{where}: message {i + 1} ({m['role']}) is empty: give it text or remove it")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to train on: add one or remove the line")
    return messages


def to_turn(turn, where: str, i: int) -> dict:
    if not isinstance(turn, dict):
        raise DataError(f"{where}: turn {i + 1} is a {type(turn).__name__}, not {{role, content}}")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role not in ALIASES:
        raise DataError(f"{where}: turn {i + 1} has the role {role!r}: use {', '.join(ROLES)} (ShareGPT: human, gpt, system)")
    if not isinstance(content, str):
        raise DataError(f"{where}: turn {i + 1} ({role}) has no text content")
    return {"role": ALIASES[role], "content": without_surrogates(content)[0]}


def _text(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} is {'missing' if value is None else 'not text'}")
    return without_surrogates(value)[0]
