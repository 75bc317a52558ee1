"""Preference pairs out of JSONL files, in the forms users have them: a prompt and two replies, one preferred.

    {"prompt": "...", "chosen": "...", "rejected": "..."}                                  strings
    {"prompt": [{role, content}, ...], "chosen": [{role, content}], "rejected": [...]}      messages (TRL's form)
    {"chosen": [{role, content}, ...], "rejected": [{role, content}, ...]}                  whole conversations:
                                                                                            the prompt is what they share

A prompt string is a user turn and a reply string an assistant turn; a top-level "system" string becomes
the first message. ShareGPT turns ({from, value}) are read too. Each reply must end with an assistant turn.

A pair is (prompt, chosen, rejected), each a list of {role, content}. `read_pairs` yields it, or None for a
pair that cannot teach a preference (an empty reply, or two identical ones), which the writer counts and
drops; a record that is no pair at all (bad JSON, an unknown role, no reply) stops the read with one line
naming the file and line, as for conversations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from scalelm.data.conversations import to_turn
from scalelm.data.readers import jsonl_records, without_surrogates
from scalelm.errors import DataError

FORMS = ("prompt/chosen/rejected as strings or as lists of {role, content}, or chosen/rejected as whole "
         "conversations that share their prompt")
Pair = tuple[list[dict], list[dict], list[dict]]


def read_pairs(files: Sequence[Path]) -> Iterator[tuple[str, Pair | None, str | None]]:
    """("FILE:LINE", pair, why) for every record, in file order, streaming: `why` says why `pair` is None."""
    for path in files:
        for lineno, record, _ in jsonl_records(path):
            where = f"{path}:{lineno}"
            pair = to_pair(record, where)
            flaw = _flaw(pair)
            yield where, None if flaw else pair, flaw


def to_pair(record: dict, where: str) -> Pair:
    """The record's (prompt, chosen, rejected), checked for form, not for content (see `_flaw`)."""
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: not a preference pair (keys {', '.join(sorted(record)) or 'none'}): use {FORMS}")
    chosen, rejected = (_messages(record[k], "assistant", where, k) for k in ("chosen", "rejected"))
    if "prompt" in record:
        prompt = _messages(record["prompt"], "user", where, "prompt")
    else:  # whole conversations: the prompt is their common first turns
        if not isinstance(record["chosen"], list):
            raise DataError(f"{where}: no 'prompt', and chosen is not a list of turns: give a prompt, or whole "
                            f"conversations as chosen and rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if "system" in record:
        system = record["system"]
        if not isinstance(system, str):
            raise DataError(f"{where}: 'system' is not text")
        prompt = [{"role": "system", "content": without_surrogates(system)[0]}] + prompt
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or reply[0]["role"] != "assistant" or reply[-1]["role"] != "assistant":
            raise DataError(f"{where}: the {name} reply does not {'start' if reply and reply[-1]['role'] == 'assistant' else 'end'} "
                            f"with an assistant turn: a reply is what the assistant says after the prompt")
    return prompt, chosen, rejected


def _messages(value, role: str, where: str, key: str) -> list[dict]:
    """A string as one `role` turn, or a list of turns, checked."""
    if isinstance(value, str):
        return [{"role": role, "content": without_surrogates(value)[0]}]
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} is neither text nor a list of {{role, content}} turns")
    return [to_turn(t, where, i) for i, t in enumerate(value)]


def _flaw(pair: Pair) -> str | None:
    """Why a well-formed pair cannot be trained on: 'empty' (a reply with no text) or 'identical'; else None."""
    _, chosen, rejected = pair
    if any(not m["content"].strip() for m in chosen + rejected if m["role"] == "assistant"):
        return "empty"
    if chosen == rejected:
        return "identical"
    return None
