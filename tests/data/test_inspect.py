import shutil

import pytest

from scalelm.data.inspect import inspect_shards
from scalelm.data.tokenizer import train_tokenizer
from scalelm.errors import DataError


def test_summary_and_decoded_sample(pipeline):
    lines = list(inspect_shards(str(pipeline["shards"]), tokenizer=pipeline["tokenizer"]))
    assert "vocabulary 400" in lines[0] and lines[1].startswith("  train: ") and lines[2].startswith("  val: ")
    assert lines[3].startswith("  first tokens of train-000000.tar: ")


def test_verify_passes_on_intact_shards(pipeline):
    lines = list(inspect_shards(str(pipeline["shards"]), verify=True))
    assert lines[-1].startswith("all ") and lines[-1].endswith(" shards verified")


def test_verify_names_a_silently_changed_shard(pipeline, tmp_path):
    copy = shutil.copytree(pipeline["shards"], tmp_path / "copy")
    victim = copy / "val-000000.tar"
    data = bytearray(victim.read_bytes())
    data[512 + 100] ^= 0xFF  # one flipped byte in the first sample's payload: only the sha256 can tell
    victim.write_bytes(bytes(data))
    lines = []
    with pytest.raises(DataError, match=r"1 of \d+ shards .* failed verification"):
        for line in inspect_shards(str(copy), verify=True):
            lines.append(line)
    assert [line for line in lines if "BAD" in line] == [f"  BAD  {victim}: sha256 differs from the manifest"]


def test_decoding_with_another_tokenizer_is_refused(pipeline, tmp_path):
    other = tmp_path / "other.model"
    train_tokenizer([pipeline["docs"]], other, vocab_size=420, workers=1)
    with pytest.raises(DataError, match="is not the tokenizer .* was made with"):
        list(inspect_shards(str(pipeline["shards"]), tokenizer=other))


def test_chat_shards_say_what_they_hold(chat):
    from scalelm.data.inspect import inspect_shards

    lines = list(inspect_shards(str(chat["shards"]), verify=True))
    assert "conversations of up to 128 tokens" in lines[1] and "assistant targets" in lines[1]
    assert lines[-1].startswith("all ") and lines[-1].endswith(" shards verified")  # the flags travel in the same tars
