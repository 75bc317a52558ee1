"""Finetuning sets made from the plays of the demo corpus (data/demo.py), for the demo stages:

    demo_conversations   OUT/conversations.jsonl   a speech as the user's turn, the next speaker's reply as the
                                                   assistant's (`scalelm shard --chat`)
    demo_pairs           OUT/pairs.jsonl           the same prompt, the real reply chosen and the reply with two
                                                   neighbouring words swapped rejected (`scalelm shard --preference`)
    demo_prompts         OUT/prompts.jsonl         the same conversations' system and user turns alone, the real
                                                   reply kept as metadata (`scalelm shard --prompts`, for RL)
    demo_passages        OUT/texts.jsonl           speeches labelled with the play they come from
                                                   (`scalelm shard --labels`)

Every set is the same for every run: the plays are read in name order and shuffles are seeded by the text.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterator

from scalelm.errors import DataError

# A speaker's line in the plays of the demo corpus: "Hor." or "PROSPERO." or "First Clown." alone on a line.
SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,24}\.$")
NOT_SPEAKERS = {"Exit.", "Exeunt.", "Finis.", "Flourish.", "Alarum.", "Retreat."}
# the plays of the which-play classifier: well known, and each with hundreds of speeches
CLASSIFIED_PLAYS = ("hamlet", "julius_caesar", "macbeth", "othello", "romeo_and_juliet", "tempest")


def demo_conversations(texts: Path, out: Path, max_chars: int = 200) -> dict:
    """Conversations from the plays, as JSONL: each pair of consecutive speeches by two speakers is one, the first
    the user's turn and the reply the assistant's, with the play and the replying speaker as the system prompt.
    Speeches longer than `max_chars` are left out (a small model's context is short). Returns counts."""
    counts = {"plays": 0, "speeches": 0, "conversations": 0}
    with _jsonl(out, "conversations.jsonl") as f:
        for play, speeches in _plays(texts, counts):
            for messages in _exchanges(play, speeches, max_chars):
                f.write(json.dumps({"messages": messages}) + "\n")
                counts["conversations"] += 1
    _check(counts["conversations"], texts)
    return counts


def demo_pairs(texts: Path, out: Path, max_chars: int = 80, min_words: int = 4) -> dict:
    """Preference pairs from the plays' exchanges, in TRL's conversational form: the prompt is a conversation's
    system and user turns, the chosen reply the real one, the rejected reply the same with two neighbouring words
    swapped (the same words, so only their order tells the two apart). Speeches longer than `max_chars` (a pair
    holds the prompt twice) and replies of fewer than `min_words` words are left out. Returns counts."""
    counts = {"plays": 0, "speeches": 0, "pairs": 0}
    with _jsonl(out, "pairs.jsonl") as f:
        for play, speeches in _plays(texts, counts):
            for *prompt, reply in _exchanges(play, speeches, max_chars):
                swapped = swap_words(reply["content"], seed=reply["content"])
                if len(reply["content"].split()) < min_words or swapped == reply["content"]:
                    continue
                pair = {"prompt": prompt, "chosen": [reply], "rejected": [{"role": "assistant", "content": swapped}]}
                f.write(json.dumps(pair) + "\n")
                counts["pairs"] += 1
    _check(counts["pairs"], texts)
    return counts


def demo_prompts(texts: Path, out: Path, max_chars: int = 100) -> dict:
    """Prompts for RL, as JSONL: each conversation's system and user turns (demo_conversations's, speeches of at most
    `max_chars`) without the reply, the play, the replying speaker and the real reply kept as metadata. Returns
    counts."""
    counts = {"plays": 0, "speeches": 0, "prompts": 0}
    with _jsonl(out, "prompts.jsonl") as f:
        for play, speeches in _plays(texts, counts):
            for system, user, reply in _exchanges(play, speeches, max_chars):
                speaker = system["content"].removeprefix(f"{play}. You are ").removesuffix(".")
                f.write(json.dumps({"messages": [system, user], "metadata": {"play": play, "speaker": speaker,
                                                                             "reply": reply["content"]}}) + "\n")
                counts["prompts"] += 1
    _check(counts["prompts"], texts)
    return counts


def demo_passages(texts: Path, out: Path, plays: tuple[str, ...] = CLASSIFIED_PLAYS, min_chars: int = 60,
                  max_chars: int = 500) -> dict:
    """Speeches of `plays` (file stems without shkspr- and _gut) labelled with their play's title, as JSONL
    {text, label}: the speech alone, without its speaker's name. Every play gives as many as the play with the
    fewest, taken evenly through it, so the classes are balanced and chance is 1 / len(plays). Returns counts."""
    found = {}
    for play, speeches in _plays(texts, {"plays": 0, "speeches": 0}, plays):
        found[play] = [said for _, said in speeches if min_chars <= len(said) <= max_chars]
    missing = sorted({_title(p) for p in plays} - set(found))
    if missing:
        raise DataError(f"{texts}: the demo corpus lacks {', '.join(missing)}: fetch it again (delete {texts})")
    each = min(len(kept) for kept in found.values())
    counts = {"plays": len(found), "texts": 0, "per_play": each}
    with _jsonl(out, "texts.jsonl") as f:
        for play, kept in found.items():
            for i in range(each):
                f.write(json.dumps({"text": kept[i * len(kept) // each], "label": play}) + "\n")
                counts["texts"] += 1
    _check(counts["texts"], texts)
    return counts


def swap_words(text: str, seed: str) -> str:
    """`text` with two neighbouring, different words of one line swapped, where `seed` picks; `text` itself when no
    line has two."""
    lines = [line.split() for line in text.split("\n")]
    places = [(i, j) for i, words in enumerate(lines) for j in range(len(words) - 1) if words[j] != words[j + 1]]
    if places:
        i, j = random.Random(seed).choice(places)
        lines[i][j], lines[i][j + 1] = lines[i][j + 1], lines[i][j]
    return "\n".join(" ".join(words) for words in lines)


def _exchanges(play: str, speeches: list[tuple[str, str]], max_chars: int) -> Iterator[list[dict]]:
    """[system, user, assistant] for each two consecutive speeches by two speakers, both at most `max_chars`."""
    for (who, said), (replier, reply) in zip(speeches, speeches[1:]):
        if who != replier and len(said) <= max_chars and len(reply) <= max_chars:
            yield [{"role": "system", "content": f"{play}. You are {replier.title()}."},
                   {"role": "user", "content": f"{who.title()}: {said}"},
                   {"role": "assistant", "content": reply}]


def _plays(texts: Path, counts: dict, only: tuple[str, ...] | None = None) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(title, speeches) of each play in `texts` (those named in `only`, if given) with speeches, in name order."""
    for path in sorted(texts.glob("shkspr-*_gut.txt")):
        stem = path.stem.removeprefix("shkspr-").removesuffix("_gut")
        if only is not None and stem not in only:
            continue
        speeches = _speeches(path.read_text(encoding="utf-8", errors="replace"))
        if len(speeches) >= 2:
            counts["plays"] += 1
            counts["speeches"] += len(speeches)
            yield _title(stem), speeches


def _title(stem: str) -> str:
    return stem.replace("_", " ").title()


def _speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) in order: a speaker's line after a blank line, the speech up to the next blank line."""
    speeches, lines = [], text.replace("\r\n", "\n").split("\n")
    for i in range(1, len(lines) - 1):
        name = lines[i].strip()
        if lines[i - 1].strip() or not SPEAKER.match(name) or name in NOT_SPEAKERS or not lines[i + 1].strip():
            continue
        speech = []
        for line in lines[i + 1:]:
            if not line.strip():
                break
            speech.append(line.strip())
        speeches.append((name.rstrip("."), "\n".join(speech)))
    return speeches


def _jsonl(out: Path, name: str):
    out.mkdir(parents=True, exist_ok=True)
    return open(out / name, "w")


def _check(written: int, texts: Path) -> None:
    if not written:
        raise DataError(f"{texts}: no plays with speeches found: fetch the demo corpus again (delete {texts})")
