"""`scalelm prepare`: raw text files -> cleaned, filtered, deduplicated documents + report.json.

    read (main process) -> clean + hash + MinHash (worker pool) -> filter + dedup (main) -> write

The expensive per-document work runs on every core; the decisions that need global state (has
this been seen?) run in order in the main process, so the output is the same for any core count.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from scalelm.data.clean import clean_text
from scalelm.data.dedup import Deduplicator, digest, minhash_signature
from scalelm.data.docs import DocWriter
from scalelm.data.files import make_dir
from scalelm.data.readers import ReadStats, list_input_files, read_documents
from scalelm.data.workers import batches_of_text, default_workers, imap_ordered
from scalelm.errors import DataError


def prepare(inputs: Sequence[str | Path], out: str | Path, *, min_chars: int = 100, dedup: str = "minhash",
            near_threshold: float = 0.8, text_field: str = "text", workers: int | None = None,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Clean, filter and deduplicate the documents in `inputs` into `out`; returns the report."""
    out = Path(out)
    if not 0.0 < near_threshold <= 1.0:
        raise DataError(f"--near-threshold {near_threshold} must be in (0, 1]: e.g. 0.8")
    if out.exists() and any(out.glob("docs-*.jsonl.zst")) and not overwrite:
        raise DataError(f"{out} already holds prepared documents: choose another --out or pass --overwrite")
    stats = ReadStats()
    files = list_input_files(inputs, stats, exclude=out)
    if not files:
        raise DataError(f"no readable files in {', '.join(map(str, inputs))}: scalelm reads .txt, .jsonl and .parquet (plain, .gz or .zst)")
    make_dir(out)
    for old in out.glob("docs-*.jsonl.zst"):
        old.unlink()

    started = time.time()
    workers = workers or default_workers()
    deduper = Deduplicator(dedup, near_threshold)
    dropped: Counter[str] = Counter()
    chars_read = chars_kept = kept = 0
    writer = DocWriter(out)
    batches = batches_of_text(read_documents(files, text_field, stats))
    jobs = ((batch, min_chars, dedup == "minhash") for batch in batches)
    with tqdm(desc="prepare", unit=" docs", disable=not progress, mininterval=1.0) as bar:
        for results in imap_ordered(_process_batch, jobs, workers):
            for raw_chars, text, key, signature in results:
                chars_read += raw_chars
                # an empty document is never kept, whatever --min-chars says
                reason = "too_short" if len(text) < max(1, min_chars) else deduper.check(key, signature)
                if reason:
                    dropped[reason] += 1
                else:
                    writer.write(text)
                    kept += 1
                    chars_kept += len(text)
            bar.update(len(results))
            bar.set_postfix(kept=kept, dropped=sum(dropped.values()), refresh=False)
    outputs = writer.close()

    report = {
        "inputs": [str(p) for p in inputs],
        "files_read": stats.files,
        "files_skipped": stats.skipped_files,
        "documents": {"read": stats.documents, "kept": kept,
                      "dropped": {r: dropped[r] for r in ("too_short", "exact_duplicate", "near_duplicate")}},
        "characters": {"read": chars_read, "kept": chars_kept},
        "non_utf8": {"documents": stats.non_utf8_documents, "replaced_chars": stats.replaced_chars},
        "settings": {"min_chars": min_chars, "dedup": dedup, "near_duplicate_threshold": near_threshold,
                     "text_field": text_field},
        "outputs": outputs,
        "seconds": round(time.time() - started, 3),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if stats.documents == 0:
        raise DataError(f"no documents in {', '.join(map(str, inputs))}: the files are empty")
    if kept == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in dropped.items() if n)
        raise DataError(f"all {stats.documents} documents were dropped ({reasons}); see {out / 'report.json'}"
                        + (f" and lower --min-chars (now {min_chars})" if dropped["too_short"] else ""))
    return report


def _process_batch(args: tuple[list[str], int, bool]) -> list[tuple[int, str, bytes, object]]:
    """Worker: clean each document and compute what deduplication needs."""
    texts, min_chars, want_minhash = args
    results = []
    for raw in texts:
        text = clean_text(raw)
        signature = minhash_signature(text) if want_minhash and len(text) >= max(1, min_chars) else None
        results.append((len(raw), text, digest(text), signature))
    return results
