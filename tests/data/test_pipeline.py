"""Raw text -> documents -> tokenizer -> shards -> batches, through the installed `scalelm` command."""

import gzip
import json
import subprocess
import sys

import torch

from scalelm.data.loader import TokenLoader
from scalelm.data.tokenizer import load_tokenizer
from tests.helpers.corpus import write_corpus


def scalelm(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "scalelm", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_raw_text_to_resumable_batches(tmp_path):
    raw = write_corpus(tmp_path / "raw", n_docs=150, seed=5)
    # the same corpus again as .jsonl.gz (all exact duplicates) and one plain-text document
    with gzip.open(raw / "copy.jsonl.gz", "wt") as f:
        f.write((raw / "corpus.jsonl").read_text())
    (raw / "note.txt").write_text("A plain text document that is long enough to keep. " * 5)

    out = scalelm("prepare", raw, "--out", tmp_path / "docs", "--workers", "2")
    report = json.loads((tmp_path / "docs" / "report.json").read_text())
    assert report["documents"]["kept"] == 151 and report["documents"]["dropped"]["exact_duplicate"] == 150
    assert "kept 151 of 301 documents" in out

    scalelm("tokenizer", "train", tmp_path / "docs", "--vocab-size", "400", "--out", tmp_path / "tok.model")
    out = scalelm("shard", tmp_path / "docs", "--tokenizer", tmp_path / "tok.model", "--out", tmp_path / "shards",
                  "--shard-size", "64KB", "--val-fraction", "0.1")
    assert "train tokens in" in out
    assert "all " in scalelm("inspect", tmp_path / "shards", "--verify")

    sp = load_tokenizer(tmp_path / "tok.model")
    make = lambda: TokenLoader([tmp_path / "shards"], split="train", seq_len=64, micro_batch_size=4,  # noqa: E731
                               num_workers=2, tokenizer_sha256=json.loads((tmp_path / "tok.json").read_text())["sha256"])
    first = make()
    batches = [b["input_ids"] for _, b in zip(range(6), first)]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    straight = [b["input_ids"] for _, b in zip(range(9), make())]
    assert all(torch.equal(a, b) for a, b in zip(straight, batches + [b["input_ids"] for _, b in zip(range(3), resumed)]))
    words = set(sp.decode(batches[0][0].tolist()).lower().replace(".", " ").split())
    corpus = set((raw / "corpus.jsonl").read_text().lower().replace(".", " ").split())
    assert len(words & corpus) > 5  # batches decode to the corpus's words
