"""`scalelm shard --labels`: labelled texts into shards for a classification head, their classes in the manifest."""

import json

import numpy as np
import pytest

from scalelm.data.labelled_shards import label_names, write_labelled_shards
from scalelm.data.loader import TokenLoader
from scalelm.data.shards import read_manifest, read_shard_fields
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import DataError
from tests.helpers.corpus import write_labelled


def test_texts_are_stored_with_their_classes(pipeline, tmp_path):
    raw = write_labelled(tmp_path / "raw", n=60)
    m = write_labelled_shards([raw], pipeline["tokenizer"], tmp_path / "out", seq_len=24, val_fraction=0.2, progress=False)
    assert m["kind"] == "labelled" and m["chat"]["labels"] == ["comedy", "history", "tragedy"]
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    sp = load_tokenizer(pipeline["tokenizer"])
    expected = {tuple([sp.bos_id(), *sp.encode(r["text"])][:24]): m["chat"]["labels"].index(r["label"]) for r in records}
    seen = 0
    for split in ("train", "val"):
        s = read_manifest(tmp_path / "out", split)
        assert s.labels == ["comedy", "history", "tragedy"] and not s.pairs
        for shard in s.shards:
            tokens = read_shard_fields(shard, {"tokens": s.dtype})["tokens"]
            starts = np.cumsum((0,) + shard.lengths)
            for a, b, cls in zip(starts[:-1], starts[1:], shard.classes):
                assert expected[tuple(int(t) for t in tokens[a:b])] == cls
                seen += 1
    assert seen == 60 and m["splits"]["train"]["truncated"] + m["splits"]["val"]["truncated"] > 0
    assert sum(m["splits"]["train"]["per_class"]) == m["splits"]["train"]["texts"]


def test_windows_carry_each_text_class_at_its_column(pipeline, tmp_path):
    raw = write_labelled(tmp_path / "raw", n=40)
    write_labelled_shards([raw], pipeline["tokenizer"], tmp_path / "out", seq_len=64, val_fraction=0.0, progress=False)
    batch = next(iter(TokenLoader([tmp_path / "out"], split="train", seq_len=64, micro_batch_size=2, shuffle=False)))
    for row in range(2):
        docs, classes = batch["document_ids"][row], batch["classes"][row]
        texts = int((classes >= 0).sum())
        assert texts >= 1 and (classes[texts:] == -1).all() and set(classes[:texts].tolist()) <= {0, 1, 2}
        assert int(docs.max()) in (texts - 1, texts)  # the texts, then the tail padding when there is one


def test_integer_labels_keep_their_ids():
    assert label_names([2, 0, 2]) == ["0", "1", "2"] and label_names(["b", "a", "b"]) == ["a", "b"]
    with pytest.raises(DataError, match="mix class ids and class names"):
        label_names([0, "a"])


@pytest.mark.parametrize("record, message", [
    ({"label": 1}, "no 'text'"),
    ({"text": "x", "label": -1}, "'label' is -1"),
    ({"text": "x", "label": 1.5}, "'label' is 1.5"),
    ({"text": "x"}, "'label' is None"),
])
def test_a_bad_record_names_its_line(pipeline, tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine", "label": 0}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message) as e:
        write_labelled_shards([path], pipeline["tokenizer"], tmp_path / "out", progress=False)
    assert str(e.value).startswith(f"{path}:2: ")
