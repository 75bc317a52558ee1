"""`scalelm shard --chat`: conversations into chat shards with per-token target flags, and what it reports."""

import json
import subprocess
import sys

import numpy as np
import pytest

from scalelm.data.chat import ASSISTANT, TEMPLATE_SHA256, ChatEncoder
from scalelm.data.chat_shards import write_chat_shards
from scalelm.data.conversations import read_conversations
from scalelm.data.shards import read_manifest, read_shard_fields
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import DataError
from tests.helpers.corpus import write_conversations


def test_shards_hold_each_conversation_as_the_template_renders_it(chat):
    manifest = json.loads((chat["shards"] / "manifest.json").read_text())
    assert manifest["kind"] == "chat" and manifest["chat"]["template_sha256"] == TEMPLATE_SHA256
    encoder = ChatEncoder(load_tokenizer(chat["tokenizer"]))
    encoded = [encoder.encode(m, max_tokens=128) for _, m in read_conversations([chat["raw"]])]  # the fixture's --seq-len
    expected = {tuple(ids): flags for ids, flags in filter(None, encoded)}
    seen = 0
    for split in ("train", "val"):
        shards = read_manifest(chat["shards"], split)
        for shard in shards.shards:
            fields = read_shard_fields(shard, {"tokens": shards.dtype, "flags": np.dtype(np.uint8)})
            starts = np.cumsum((0,) + shard.lengths)
            assert starts[-1] == shard.tokens
            for a, b in zip(starts[:-1], starts[1:]):
                ids = tuple(int(t) for t in fields["tokens"][a:b])
                assert np.array_equal(fields["flags"][a:b], expected[ids])  # ids and flags as encoded
                seen += 1
        split_entry = manifest["splits"][split]
        assert split_entry["targets"]["assistant"] == sum(
            int(np.count_nonzero(read_shard_fields(s, {"tokens": shards.dtype, "flags": np.dtype(np.uint8)})["flags"]
                                 & ASSISTANT)) for s in shards.shards)
    dropped = sum(manifest["splits"][split]["dropped_overlong"] for split in ("train", "val"))
    assert seen == 400 - dropped == len(expected) and manifest["splits"]["val"]["conversations"] > 0


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_long_conversations_are_cut_or_dropped_and_counted(pipeline, tmp_path, overlong):
    raw = write_conversations(tmp_path / "raw", n=60, turns=(3, 6))
    m = write_chat_shards([raw], pipeline["tokenizer"], tmp_path / "out", seq_len=96, overlong=overlong,
                          val_fraction=0.0, workers=1, progress=False)
    train = m["splits"]["train"]
    lengths = [n for s in train["shards"] for n in s["lengths"]]
    assert max(lengths) <= 96
    if overlong == "truncate":
        assert train["truncated"] > 0 and train["conversations"] + train["dropped_overlong"] == 60
    else:
        assert train["truncated"] == 0 and train["dropped_overlong"] > 0
        assert train["conversations"] + train["dropped_overlong"] == 60


def test_the_command_reports_and_refuses_bad_input(pipeline, tmp_path):
    raw = write_conversations(tmp_path / "raw", n=30)
    cli = [sys.executable, "-m", "scalelm", "shard", "--chat", str(raw), "--tokenizer", str(pipeline["tokenizer"]),
           "--out", str(tmp_path / "out"), "--seq-len", "128", "--workers", "1"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train: " in done.stdout and "conversations" in done.stdout and "dropped as longer than --seq-len 128" in done.stdout
    with open(raw, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    bad = subprocess.run(cli + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == f"scalelm: error: {raw}:31: the conversation has no assistant turn, so nothing to " \
                                 f"train on: add one or remove the line"


def test_nothing_that_fits_is_an_error(pipeline, tmp_path):
    raw = write_conversations(tmp_path / "raw", n=5)
    with pytest.raises(DataError, match="no conversation .* fits --seq-len 8"):
        write_chat_shards([raw], pipeline["tokenizer"], tmp_path / "out", seq_len=8, workers=1, progress=False)
