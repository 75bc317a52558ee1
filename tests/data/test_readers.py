import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from scalelm.data.readers import ReadStats, decode_utf8, list_input_files, read_documents
from scalelm.errors import DataError


def test_every_format(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("gzipped text")
    lines = "".join(json.dumps({"text": t}) + "\n" for t in ["j1", "j2"])
    (tmp_path / "c.jsonl").write_text(lines + "\n")  # a blank line is ignored
    with zstandard.open(tmp_path / "d.jsonl.zst", "wt") as f:
        f.write(lines)
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write(lines)
    pq.write_table(pa.table({"text": ["p1", "p2"], "id": [1, 2]}), tmp_path / "f.parquet")
    (tmp_path / "notes.md").write_text("ignored")
    stats = ReadStats()
    files = list_input_files([tmp_path], stats)
    docs = list(read_documents(files, stats=stats))
    assert docs == ["plain text file", "gzipped text", "j1", "j2", "j1", "j2", "j1", "j2", "p1", "p2"]
    assert stats.files == 6 and stats.documents == 10
    assert stats.skipped_files == [str(tmp_path / "notes.md")]


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café naïve".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok \xff\xfe here"}\n{"text": "fine"}\n')
    stats = ReadStats()
    docs = list(read_documents(list_input_files([tmp_path]), stats=stats))
    assert docs[0] == "ok \ufffd\ufffd here" and docs[1] == "fine" and docs[2] == "caf\ufffd na\ufffdve"
    assert stats.non_utf8_documents == 2 and stats.replaced_chars == 4


def test_large_jsonl_is_streamed(tmp_path):
    with gzip.open(tmp_path / "big.jsonl.gz", "wt") as f:
        for i in range(20000):
            f.write(json.dumps({"text": f"document {i}"}) + "\n")
    docs = read_documents([tmp_path / "big.jsonl.gz"])
    assert next(docs) == "document 0" and sum(1 for _ in docs) == 19999


def test_decode_does_not_count_real_replacement_characters():
    assert decode_utf8("already \ufffd".encode()) == ("already \ufffd", 0)


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"input not found: {tmp_path / 'nope'}"):
        list_input_files([tmp_path / "nope"])


def test_unsupported_named_file(tmp_path):
    (tmp_path / "x.docx").write_bytes(b"PK")
    with pytest.raises(DataError, match="x.docx: unsupported file type"):
        list_input_files([tmp_path / "x.docx"])


@pytest.mark.parametrize("content, message", [
    (b'{"text": "a"}\n{not json}\n', r"bad.jsonl:2: not valid JSON"),
    (b'{"body": "a"}\n', r"bad.jsonl:1: no 'text' field: name the text field with --text-field"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(read_documents([tmp_path / "bad.jsonl"]))


def test_text_field_option(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    pq.write_table(pa.table({"body": ["p"]}), tmp_path / "b.parquet")
    assert list(read_documents(list_input_files([tmp_path]), text_field="body")) == ["hello", "p"]
    with pytest.raises(DataError, match=r"b.parquet: no 'text' column \(has body\)"):
        list(read_documents([tmp_path / "b.parquet"]))


@pytest.mark.parametrize("name", ["cut.txt.gz", "cut.txt.zst", "cut.jsonl.gz", "cut.jsonl.zst"])
def test_truncated_compressed_file_is_named(tmp_path, name):
    lines = "".join(json.dumps({"text": f"line {i} " * 20}) + "\n" for i in range(2000)).encode()
    data = gzip.compress(lines) if name.endswith(".gz") else zstandard.ZstdCompressor().compress(lines)
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{name}: cannot be read .* truncated or corrupt"):
        list(read_documents([tmp_path / name]))


def test_several_zstd_frames_in_one_file(tmp_path):
    frames = [zstandard.ZstdCompressor().compress((json.dumps({"text": t}) + "\n").encode()) for t in "ab"]
    (tmp_path / "two.jsonl.zst").write_bytes(b"".join(frames))
    assert list(read_documents([tmp_path / "two.jsonl.zst"])) == ["a", "b"]


def test_lone_surrogates_and_null_text(tmp_path):
    (tmp_path / "odd.jsonl").write_text('{"text": "lone \\ud800 here"}\n{"text": null}\n')
    stats = ReadStats()
    assert list(read_documents([tmp_path / "odd.jsonl"], stats=stats)) == ["lone \ufffd here", ""]
    assert stats.replaced_chars == 1
    (tmp_path / "num.jsonl").write_text('{"text": 12345}\n')
    with pytest.raises(DataError, match=r"num.jsonl:1: 'text' holds a int, not text"):
        list(read_documents([tmp_path / "num.jsonl"]))


def test_hidden_files_and_an_excluded_folder_are_not_read(tmp_path):
    (tmp_path / "a.txt").write_text("kept")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "docs-00000.jsonl").write_text('{"text": "old output"}\n')
    assert list_input_files([tmp_path], exclude=tmp_path / "out") == [tmp_path / "a.txt"]
