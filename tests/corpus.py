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
