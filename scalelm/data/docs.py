"""The prepared-documents format: `docs-NNNNN.jsonl.zst` files of `{"text": ...}` lines.

Files roll over at `max_bytes` of uncompressed JSON; each is written to a temporary name and
renamed when complete, so a directory never holds a half-written file under a real name.
"""

from __future__ import annotations

import json
from pathlib import Path

import zstandard

PATTERN = "docs-{:05d}.jsonl.zst"


class DocWriter:
    """Append cleaned documents; `close()` returns the file names written."""

    def __init__(self, out_dir: Path, max_bytes: int = 256 << 20):
        self.out_dir = out_dir
        self.max_bytes = max_bytes
        self.files: list[str] = []
        self._stream = None
        self._written = 0

    def write(self, text: str) -> None:
        if self._stream is None or self._written >= self.max_bytes:
            self._roll()
        line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode()
        self._stream.write(line)
        self._written += len(line)

    def close(self) -> list[str]:
        self._finish()
        return self.files

    def _roll(self) -> None:
        self._finish()
        name = PATTERN.format(len(self.files))
        self._tmp = self.out_dir / f".{name}.tmp"
        self._stream = zstandard.open(self._tmp, "wb", cctx=zstandard.ZstdCompressor(level=3))
        self._written = 0
        self.files.append(name)

    def _finish(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._tmp.rename(self.out_dir / self.files[-1])
            self._stream = None
