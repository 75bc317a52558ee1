"""checkpoint/base.py: a LoRA checkpoint's base, named by path and by the SHA-256 of its manifest, found or refused."""

import json

import pytest

from scalelm.checkpoint import store
from scalelm.checkpoint.base import base_of, locate
from scalelm.errors import CheckpointError


def checkpoint(path, step: int, base: dict | None = None):
    path.mkdir(parents=True)
    (path / store.MANIFEST).write_text(json.dumps({"format": store.FORMAT, "version": store.VERSION, "step": step,
                                                   "base": base, "files": {}, "tensors": {}}))
    return path


def test_the_base_is_named_by_absolute_path_and_hash(tmp_path, monkeypatch):
    step = checkpoint(tmp_path / "run" / "checkpoints" / "step-00000004", 4)
    monkeypatch.chdir(tmp_path)
    record = base_of("run/checkpoints")  # a checkpoint.dir: its newest, by its absolute path
    assert record["path"] == str(step.resolve()) and len(record["sha256"]) == 64
    lora = checkpoint(tmp_path / "lora" / "step-00000002", 2, base=record)
    assert base_of(lora) == record  # a LoRA checkpoint's base is its base's


def test_locate_finds_the_recorded_base_or_refuses_other_weights(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    record = base_of(checkpoint(run / "step-00000004", 4))
    assert locate(record, None, "L", "--base PATH")[0] == run / "step-00000004"
    checkpoint(run / "step-00000008", 8)  # the run went on: its newest is other weights, the recorded step is still there
    assert locate(record, run, "L", "--base PATH")[0] == run / "step-00000004"
    other = checkpoint(tmp_path / "other", 5)
    with pytest.raises(CheckpointError, match=r"is not the base L was trained on .*give that base with --base PATH"):
        locate(record, other, "L", "--base PATH")
    moved = tmp_path / "moved"
    (run / "step-00000004").rename(moved)
    with pytest.raises(CheckpointError, match="which cannot be read .*: give its path with --base PATH"):
        locate(record, None, "L", "--base PATH")
    assert locate(record, moved, "L", "--base PATH")[0] == moved.resolve()
