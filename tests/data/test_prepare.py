import json
import random

import pytest

from scalelm.data.prepare import prepare
from scalelm.data.readers import list_input_files, read_documents
from scalelm.errors import DataError
from tests.helpers.corpus import make_document, make_words, write_corpus

_rng = random.Random(0)
LONG, OTHER, THIRD = (make_document(_rng, make_words(300), 30) for _ in range(3))


def docs_in(folder):
    return list(read_documents(list_input_files([folder])))


def test_clean_filter_dedup_and_report(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    words = LONG.split(" ")
    near = " ".join(words[:100] + ["CHANGED"] + words[101:])  # 5 of ~300 word 5-grams differ
    records = [LONG, "short", LONG, "  " + LONG.replace(" ", "\u00a0") + "\n\n\n", near, OTHER]
    (raw / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    (raw / "b.txt").write_bytes(b"\xff" + THIRD.encode())
    report = prepare([raw], tmp_path / "out", min_chars=50, workers=1, progress=False)
    kept = docs_in(tmp_path / "out")
    # exact duplicates are found after cleaning: NBSP and blank lines normalise to the first document
    assert kept == [LONG, OTHER, "\ufffd" + THIRD]
    assert report["documents"] == {"read": 7, "kept": 3,
                                   "dropped": {"too_short": 1, "exact_duplicate": 2, "near_duplicate": 1}}
    assert report["non_utf8"] == {"documents": 1, "replaced_chars": 1}
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report


def test_same_output_on_one_or_many_workers(tmp_path):
    raw = write_corpus(tmp_path / "raw", n_docs=60)
    one = prepare([raw], tmp_path / "one", workers=1, progress=False)
    two = prepare([raw], tmp_path / "two", workers=2, progress=False)
    assert docs_in(tmp_path / "one") == docs_in(tmp_path / "two")
    assert one["documents"] == two["documents"]


def test_refuses_to_overwrite_without_flag(tmp_path):
    raw = write_corpus(tmp_path / "raw", n_docs=3)
    prepare([raw], tmp_path / "out", workers=1, progress=False)
    with pytest.raises(DataError, match="already holds prepared documents: choose another --out or pass --overwrite"):
        prepare([raw], tmp_path / "out", workers=1, progress=False)
    prepare([raw], tmp_path / "out", workers=1, progress=False, overwrite=True, dedup="none")


def test_empty_corpus(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="no readable files"):
        prepare([tmp_path / "raw"], tmp_path / "out", progress=False)
    (tmp_path / "raw" / "empty.txt").write_text("")
    (tmp_path / "raw" / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"all 1 documents were dropped \(too_short: 1\).*lower --min-chars \(now 100\)"):
        prepare([tmp_path / "raw"], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "report.json").exists()  # the report is written even then


def test_missing_input(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        prepare([tmp_path / "absent"], tmp_path / "out", progress=False)


def test_output_inside_the_input_folder_is_not_read_back(tmp_path):
    raw = write_corpus(tmp_path / "raw", n_docs=5)
    for _ in range(2):  # the second run must not read the first run's output as input
        report = prepare([raw], raw / "docs", workers=1, progress=False, overwrite=True)
        assert report["documents"]["read"] == 5 and report["files_read"] == 1
