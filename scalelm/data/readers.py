"""Read documents out of .txt, .jsonl and .parquet files, plain or compressed (.gz, .zst).

A .txt file is one document; a .jsonl line or a .parquet row is one document, its text in
`text_field`. Files are streamed, so a corpus of any size reads in bounded memory; a truncated
compressed file is an error, not a quiet early end. Bytes that are not UTF-8 (and lone surrogates
spelled in JSON) are replaced with U+FFFD and counted, never fatal.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import zstandard

from scalelm.errors import DataError

FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = ("", ".gz", ".zst")
SUPPORTED = ".txt, .jsonl and .parquet, and .txt/.jsonl compressed as .gz or .zst"


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


def list_input_files(inputs: Sequence[str | Path], stats: ReadStats | None = None,
                     exclude: Path | None = None) -> list[Path]:
    """Expand files and directories (recursively, sorted) into the files scalelm can read.

    A named file of an unknown type is an error; inside directories such files are skipped and
    recorded in `stats.skipped_files`, hidden files and folders are ignored, and so is `exclude`
    (an output directory inside an input directory).
    """
    exclude = exclude.resolve() if exclude is not None else None
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
            relative = child.relative_to(path).parts
            if any(part.startswith(".") for part in relative) or (exclude and exclude in child.resolve().parents):
                continue
            if split_suffix(child) != ("", ""):
                files.append(child)
            elif stats is not None:
                stats.skipped_files.append(str(child))
    return files


def read_documents(files: Sequence[Path], text_field: str = "text", stats: ReadStats | None = None) -> Iterator[str]:
    """Yield each document's text, in file order, streaming; replaced non-UTF-8 bytes are counted in `stats`."""
    stats = stats if stats is not None else ReadStats()
    for path in files:
        stats.files += 1
        try:
            for text, replaced in _documents(path, text_field):
                stats.documents += 1
                if replaced:
                    stats.non_utf8_documents += 1
                    stats.replaced_chars += replaced
                yield text
        except (OSError, EOFError, zstandard.ZstdError) as e:
            raise DataError(f"{path}: cannot be read ({' '.join(str(e).split())}); is it truncated or corrupt?") from None


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing bad bytes with U+FFFD; returns (text, number of replacements)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


def _documents(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    fmt, compression = split_suffix(path)
    if fmt == ".parquet":
        yield from _parquet_texts(path, text_field)
    elif fmt == ".txt":
        yield decode_utf8(b"".join(_chunks(path, compression)))
    else:
        yield from _jsonl_texts(path, text_field)


def _chunks(path: Path, compression: str, size: int = 1 << 20) -> Iterator[bytes]:
    """The file's decompressed bytes in pieces; a truncated .gz or .zst raises instead of ending early."""
    if compression == ".zst":
        yield from _zstd_chunks(path, size)
        return
    with (gzip.open(path, "rb") if compression == ".gz" else open(path, "rb")) as f:
        while block := f.read(size):
            yield block


def _zstd_chunks(path: Path, size: int) -> Iterator[bytes]:
    # NOTE: zstandard's stream reader ends quietly at a truncated frame; a decompressobj tells
    # whether each frame reached its end, and a file may hold several frames back to back.
    dctx = zstandard.ZstdDecompressor()
    with open(path, "rb") as f:
        dobj, fed = dctx.decompressobj(), False
        while block := f.read(size):
            while block:
                yield dobj.decompress(block)
                fed = True
                if dobj.eof:
                    block, dobj, fed = dobj.unused_data, dctx.decompressobj(), False
                else:
                    block = b""
        if fed and not dobj.eof:
            raise EOFError("the last zstd frame ends early")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        *complete, rest = (rest + chunk).split(b"\n")
        yield from complete
    if rest:
        yield rest


_SURROGATES = re.compile("[\ud800-\udfff]")


def jsonl_records(path: Path) -> Iterator[tuple[int, dict, int]]:
    """(line number, record, characters replaced) of each non-blank line of a .jsonl file, plain, .gz or .zst,
    streamed; a line that is not a JSON object is an error naming the file and line."""
    try:
        for lineno, raw in enumerate(_lines(_chunks(path, split_suffix(path)[1])), 1):
            if not raw.strip():
                continue
            line, replaced = decode_utf8(raw)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}): fix or remove the line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: a JSON {type(record).__name__}, not an object: fix or remove the line")
            yield lineno, record, replaced
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise DataError(f"{path}: cannot be read ({' '.join(str(e).split())}); is it truncated or corrupt?") from None


def without_surrogates(text: str) -> tuple[str, int]:
    """JSON escapes can spell lone surrogates ("\\ud800"), which no UTF-8 file can hold: U+FFFD instead, counted."""
    return _SURROGATES.subn("\ufffd", text)


def _jsonl_texts(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    for lineno, record, replaced in jsonl_records(path):
        if text_field not in record:
            raise DataError(f"{path}:{lineno}: no {text_field!r} field: name the text field with --text-field")
        text = record[text_field]
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: {text_field!r} holds a {type(text).__name__}, not text: fix the record")
        text, surrogates = without_surrogates(text)
        yield text, replaced + surrogates


def _parquet_texts(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a bad footer
        raise DataError(f"{path}: not a readable parquet file ({' '.join(str(e).split())})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no {text_field!r} column (has {', '.join(names)}): name it with --text-field")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield (value, 0) if isinstance(value, str) else decode_utf8(value or b"")
