"""Read documents out of .txt, .jsonl and .parquet files, plain or compressed (.gz, .zst).

A .txt file is one document; a .jsonl line or a .parquet row is one document, its text in
`text_field`. Bytes that are not UTF-8 are replaced with U+FFFD and counted, never fatal.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import zstandard

from scalelm.errors import DataError

FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = ("", ".gz", ".zst")
SUPPORTED = "'.txt', '.jsonl', '.parquet', and .txt/.jsonl compressed as .gz or .zst"


@dataclass
class ReadStats:
    """What reading found, for the prepare report."""

    files: int = 0
    documents: int = 0
    non_utf8_documents: int = 0
    replaced_chars: int = 0
    skipped_files: list[str] = field(default_factory=list)


def split_suffix(path: Path) -> tuple[str, str]:
    """('.jsonl', '.zst') for docs.jsonl.zst; ('', '') for a name scalelm does not read."""
    name = path.name.lower()
    for compression in COMPRESSIONS:
        for fmt in FORMATS:
            if name.endswith(fmt + compression) and not (fmt == ".parquet" and compression):
                return fmt, compression
    return "", ""


def list_input_files(inputs: Sequence[str | Path], stats: ReadStats | None = None) -> list[Path]:
    """Expand files and directories (recursively, sorted) into the files scalelm can read.

    A named file of an unknown type is an error; inside directories such files are skipped and
    recorded in `stats.skipped_files`.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"input not found: {path}: check the path")
        if path.is_file():
            if split_suffix(path) == ("", ""):
                raise DataError(f"{path}: unsupported file type; scalelm reads {SUPPORTED}")
            files.append(path)
            continue
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            if split_suffix(child) != ("", ""):
                files.append(child)
            elif stats is not None and not child.name.startswith("."):
                stats.skipped_files.append(str(child))
    return files


def read_documents(files: Sequence[Path], text_field: str = "text", stats: ReadStats | None = None) -> Iterator[str]:
    """Yield each document's text, in file order, counting replaced non-UTF-8 bytes in `stats`."""
    stats = stats if stats is not None else ReadStats()
    for path in files:
        stats.files += 1
        fmt, compression = split_suffix(path)
        try:
            if fmt == ".parquet":
                docs = [decode_utf8(raw) for raw in _parquet_texts(path, text_field)]
            else:
                with _open(path, compression) as stream:
                    docs = [decode_utf8(stream.read())] if fmt == ".txt" else list(_jsonl_texts(stream, path, text_field))
        except (OSError, EOFError, zstandard.ZstdError) as e:
            raise DataError(f"{path}: cannot be read ({' '.join(str(e).split())}); is it truncated or corrupt?") from None
        for text, replaced in docs:
            stats.documents += 1
            if replaced:
                stats.non_utf8_documents += 1
                stats.replaced_chars += replaced
            yield text


def decode_utf8(data: bytes | str) -> tuple[str, int]:
    """Decode UTF-8, replacing bad bytes with U+FFFD; returns (text, number of replacements)."""
    if isinstance(data, str):
        return data, 0
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


def _open(path: Path, compression: str) -> BinaryIO:
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl_texts(stream: BinaryIO, path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        line, replaced = decode_utf8(line)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}): fix or remove the line") from None
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{lineno}: no {text_field!r} field: name the text field with --text-field")
        text = record[text_field]
        yield (text if isinstance(text, str) else str(text)), replaced


def _parquet_texts(path: Path, text_field: str) -> list[bytes | str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a bad footer
        raise DataError(f"{path}: not a readable parquet file ({' '.join(str(e).split())})") from None
    if text_field not in schema.names:
        raise DataError(f"{path}: no {text_field!r} column (has {', '.join(schema.names)}): name it with --text-field")
    column = pq.read_table(path, columns=[text_field]).column(0)
    return [v if v is not None else "" for v in column.to_pylist()]
