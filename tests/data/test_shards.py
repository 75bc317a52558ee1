import json

import numpy as np
import pytest

from scalelm.data.files import sha256_file
from scalelm.data.readers import list_input_files, read_documents
from scalelm.data.shards import MANIFEST, is_val, parse_size, read_manifest, read_shard, token_dtype, write_shards
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import DataError


def test_manifest_matches_the_files(pipeline):
    shards = pipeline["shards"]
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == 2
    assert manifest["tokenizer"]["sha256"] == sha256_file(pipeline["tokenizer"])
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 1
    for entry in train["shards"] + manifest["splits"]["val"]["shards"]:
        path = shards / entry["name"]
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        [MANIFEST] + [e["name"] for s in manifest["splits"].values() for e in s["shards"]])


def test_shards_hold_every_document_then_eos(pipeline):
    """Decoding the shards gives back the documents: every token is accounted for."""
    sp = load_tokenizer(pipeline["tokenizer"])
    docs = list(read_documents(list_input_files([pipeline["docs"]])))
    for split in ("train", "val"):
        shard_set = read_manifest(pipeline["shards"], split)
        tokens = np.concatenate([read_shard(s, shard_set.dtype) for s in shard_set.shards])
        expected = [d for d in docs if is_val(d, 0.1) == (split == "val")]
        assert tokens.size == shard_set.tokens
        pieces = np.split(tokens, np.flatnonzero(tokens == sp.eos_id()) + 1)[:-1]
        assert [sp.decode(p[:-1].tolist()) for p in pieces] == expected
    assert 0 < read_manifest(pipeline["shards"], "val").tokens < read_manifest(pipeline["shards"], "train").tokens


def test_same_shards_on_any_number_of_workers(pipeline, tmp_path):
    write_shards([pipeline["docs"]], pipeline["tokenizer"], tmp_path / "two", shard_size=64 << 10,
                 val_fraction=0.1, workers=2, progress=False)
    ours = json.loads((pipeline["shards"] / MANIFEST).read_text())["splits"]
    theirs = json.loads((tmp_path / "two" / MANIFEST).read_text())["splits"]
    assert ours == theirs  # same names, token counts and sha256 per shard


def test_dtype_and_sizes():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert parse_size("256MB") == 256 << 20 and parse_size("1.5GiB") == 3 << 29 and parse_size("4096") == 4096
    with pytest.raises(DataError, match="size '12 parsecs' is not understood"):
        parse_size("12 parsecs")


def test_writer_refuses_to_overwrite_and_bad_arguments(pipeline, tmp_path):
    with pytest.raises(DataError, match="already holds shards"):
        write_shards([pipeline["docs"]], pipeline["tokenizer"], pipeline["shards"], progress=False)
    with pytest.raises(DataError, match="--val-fraction 1.5 must be in"):
        write_shards([pipeline["docs"]], pipeline["tokenizer"], tmp_path / "x", val_fraction=1.5, progress=False)
    with pytest.raises(DataError, match="tokenizer not found"):
        write_shards([pipeline["docs"]], tmp_path / "none.model", tmp_path / "x", progress=False)


def test_missing_manifest_and_directory(tmp_path):
    with pytest.raises(DataError, match="shard directory not found"):
        read_manifest(tmp_path / "absent", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json is missing: .* was not written by `scalelm shard`"):
        read_manifest(tmp_path / "empty", "train")


def test_tokenizer_mismatch_is_refused(pipeline):
    with pytest.raises(DataError, match="made with another tokenizer .* re-shard with this tokenizer"):
        read_manifest(pipeline["shards"], "train", tokenizer_sha256="0" * 64)


@pytest.mark.parametrize("source, message", [
    ("s3://bucket/shards", "WebDataset has no reader for s3:// URLs"),
])
def test_unreadable_url_schemes(source, message):
    with pytest.raises(DataError, match=message):
        read_manifest(source, "train")


def test_malformed_manifest(pipeline, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = json.loads((pipeline["shards"] / MANIFEST).read_text())
    del manifest["splits"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"malformed manifest \(missing 'splits'\)"):
        read_manifest(copy, "train")
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="not a manifest"):
        read_manifest(copy, "train")


def test_output_path_blocked_by_a_file(pipeline, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="a file is in the way"):
        write_shards([pipeline["docs"]], pipeline["tokenizer"], tmp_path / "file", progress=False, overwrite=True)
