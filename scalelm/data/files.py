"""Files the pipeline reads and writes: SHA-256 of a file, output directories made with a clear error."""

from __future__ import annotations

import hashlib
from pathlib import Path

from scalelm.errors import DataError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed: how scalelm names a tokenizer and checks a shard."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_dir(path: Path, flag: str = "--out") -> Path:
    """Create directory `path` (and parents), or say in one line why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DataError(f"{flag} {path}: a file is in the way of this directory; choose another path") from None
    except PermissionError:
        raise DataError(f"{flag} {path}: no permission to create it; choose another path") from None
    return path
