"""Synthetic text for tests: prose-like documents from made-up words, seeded, no downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

_SYLLABLES = "ka lo mi ren ta vo shi pel dar nu ess tor bri an qu el fa zo ry wen".split()


def make_words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def make_document(rng: random.Random, words: list[str], sentences: int) -> str:
    """Prose-like text: capitalised sentences of skewed-frequency words, five to a paragraph."""
    out = []
    for _ in range(sentences):
        sentence = " ".join(words[int(len(words) * rng.random() ** 3)] for _ in range(rng.randint(4, 14)))
        out.append(sentence.capitalize() + rng.choice(".!?."))
    return "\n\n".join(" ".join(out[i : i + 5]) for i in range(0, len(out), 5))


def write_corpus(folder: Path, n_docs: int, seed: int = 0, sentences: tuple[int, int] = (20, 60)) -> Path:
    """n_docs documents as one .jsonl file; returns the folder."""
    rng = random.Random(seed)
    words = make_words(600, seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": make_document(rng, words, rng.randint(*sentences))}) + "\n")
    return folder


def make_sentence(rng: random.Random, words: list[str], low: int = 3, high: int = 12) -> str:
    return " ".join(words[int(len(words) * rng.random() ** 3)] for _ in range(rng.randint(low, high))).capitalize() + "."


def write_conversations(folder: Path, n: int, seed: int = 0, turns: tuple[int, int] = (1, 3),
                        name: str = "chats.jsonl") -> Path:
    """n conversations as one .jsonl file, in the four forms `scalelm shard --chat` reads (messages with
    and without a system prompt, ShareGPT, Alpaca, prompt/completion), of 1 to 3 exchanges; returns the file."""
    rng = random.Random(seed)
    words = make_words(300, seed + 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w") as f:
        for i in range(n):
            exchanges = [(make_sentence(rng, words), " ".join(make_sentence(rng, words) for _ in range(rng.randint(1, 4))))
                         for _ in range(rng.randint(*turns))]
            form = i % 5
            if form == 0:
                record = {"messages": [{"role": "system", "content": make_sentence(rng, words)}]
                          + [m for q, a in exchanges for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]}
            elif form == 1:
                record = {"messages": [m for q, a in exchanges
                                       for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]}
            elif form == 2:
                record = {"conversations": [m for q, a in exchanges
                                            for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]}
            elif form == 3:
                record = {"instruction": exchanges[0][0], "input": make_sentence(rng, words) if i % 2 else "",
                          "output": exchanges[0][1]}
            else:
                record = {"prompt": exchanges[0][0], "completion": exchanges[0][1]}
            f.write(json.dumps(record) + "\n")
    return path


def write_pairs(folder: Path, n: int, seed: int = 0, name: str = "pairs.jsonl", empty: int = 0, identical: int = 0) -> Path:
    """n preference pairs as one .jsonl file, in the three forms `scalelm shard --preference` reads (strings, TRL's
    message lists with a system prompt, whole conversations sharing their prompt), each a question answered by
    a sentence of the corpus's words (chosen) and a shuffle of its words (rejected); then `empty` pairs with an
    empty reply and `identical` pairs whose replies are the same. Returns the file."""
    rng = random.Random(seed)
    words = make_words(300, seed + 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w") as f:
        for i in range(n + empty + identical):
            prompt, chosen = make_sentence(rng, words), " ".join(make_sentence(rng, words) for _ in range(rng.randint(1, 2)))
            rejected = " ".join(rng.sample(chosen.split(), len(chosen.split())))
            if rejected == chosen:
                rejected += " " + rng.choice(words)
            if i >= n:
                rejected = "" if i < n + empty else chosen
            form = i % 3
            if form == 0:
                record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            elif form == 1:
                record = {"system": make_sentence(rng, words), "prompt": [{"role": "user", "content": prompt}],
                          "chosen": [{"role": "assistant", "content": chosen}],
                          "rejected": [{"role": "assistant", "content": rejected}]}
            else:
                record = {side: [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
                          for side, reply in (("chosen", chosen), ("rejected", rejected))}
            f.write(json.dumps(record) + "\n")
    return path


def write_labelled(folder: Path, n: int, classes: tuple[str, ...] = ("comedy", "history", "tragedy"), seed: int = 0,
                   name: str = "texts.jsonl") -> Path:
    """n labelled texts as one .jsonl file ({text, label}), each two sentences whose words come mostly from its
    class's own third of the corpus's words (the rest from all of them), so a classifier can learn the classes.
    Returns the file."""
    rng = random.Random(seed)
    words = make_words(300, seed + 1)
    pools = [words[i::len(classes)] for i in range(len(classes))]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w") as f:
        for i in range(n):
            k = rng.randrange(len(classes))
            text = " ".join(make_sentence(rng, pools[k] if rng.random() < 0.8 else words) for _ in range(2))
            f.write(json.dumps({"text": text, "label": classes[k]}) + "\n")
    return path
