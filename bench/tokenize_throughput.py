"""Tokenization throughput of `scalelm shard`: tokens/s in all and per core, on the demo corpus.

    python bench/tokenize_throughput.py [--docs runs/demo/docs] [--tokenizer runs/demo/tokenizer.model]

Without arguments it prepares the demo corpus and trains its tokenizer in a temporary directory
first (not timed). The timed part is the whole `shard` step: read, tokenize, write tars, hash.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from scalelm.data.demo import fetch_demo_corpus
from scalelm.data.prepare import prepare
from scalelm.data.shards import write_shards
from scalelm.data.tokenizer import train_tokenizer
from scalelm.data.workers import default_workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=None, help="prepared documents (default: the demo corpus)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="SentencePiece model (default: trained here)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per core count; the best is printed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs, tokenizer = args.docs, args.tokenizer
        if docs is None:
            docs = tmp / "docs"
            prepare([fetch_demo_corpus()], docs, progress=False)
        if tokenizer is None:
            tokenizer = tmp / "tok.model"
            train_tokenizer([docs], tokenizer, vocab_size=8000)
        cores = default_workers()
        print(f"`scalelm shard` on {docs} with {tokenizer.name}")
        for workers in sorted({1, cores}):
            best = 0.0
            for i in range(args.repeats):
                start = time.perf_counter()
                m = write_shards([docs], tokenizer, tmp / f"shards-{workers}-{i}", workers=workers, progress=False,
                                 shard_size=16 << 20, val_fraction=0.01)
                tokens = sum(s["tokens"] for s in m["splits"].values())
                best = max(best, tokens / (time.perf_counter() - start))
            print(f"  {workers} worker(s): {tokens / 1e6:.1f}M tokens, {best / 1e6:.2f} M tokens/s "
                  f"= {best / workers / 1e6:.2f} M tokens/s/core")


if __name__ == "__main__":
    main()
