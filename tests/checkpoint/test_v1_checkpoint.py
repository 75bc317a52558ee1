"""A checkpoint written by an earlier scalelm (tests/data/v1, made at commit cac9950 by
tests/data/make_v1_checkpoint.py): it loads, resumes where that run went on, and converts."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.ranks import run_ranks

V1 = Path(__file__).resolve().parents[1] / "data" / "v1"
CKPT = Path("run/checkpoints/step-00000003")


def resume_v1(root: Path) -> list[dict]:
    """Resume the copy of tests/data/v1 at `root` with the settings its checkpoint was saved with; the records of
    the steps it trained (in a rank of its own: one thread, as the checkpoint was made)."""
    import torch

    from scalelm.checkpoint import store
    from scalelm.config import load_config
    from scalelm.train.loop import pretrain

    torch.set_num_threads(1)
    os.chdir(root)
    saved = store.read_manifest(CKPT)["config"]
    pretrain(load_config(None, ["log.dir=resumed"], base=saved))
    return [json.loads(line) for line in Path("resumed/metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def v1(tmp_path) -> Path:
    shutil.copytree(V1, tmp_path / "v1")
    return tmp_path / "v1"


def test_a_v1_checkpoint_resumes_where_its_run_went_on(v1):
    """The figures of steps 4-6 were recorded where the fixture was made: a CPU with other vector units (AVX-512 or
    not) rounds the matmuls differently in the last bits, so they are compared to 1e-5 here. (That a resume is bit
    for bit on one machine is tests/checkpoint/test_checkpoint_resume.py's.)"""
    before = {r["step"]: r for r in map(json.loads, (v1 / "run/metrics.jsonl").read_text().splitlines())}
    (resumed,) = run_ranks(1, resume_v1, v1)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for record in resumed:
        assert record["lr"] == before[record["step"]]["lr"], record["step"]  # the schedule's: exact anywhere
        for key in ("loss", "grad_norm", "accuracy"):
            assert record[key] == pytest.approx(before[record["step"]][key], rel=1e-5), (record["step"], key)


def test_a_v1_checkpoint_converts_to_hugging_face(v1, tmp_path):
    from scalelm.convert.hf import to_hf

    report = to_hf(v1 / CKPT, tmp_path / "hf", tokenizer=v1 / "tok.model")
    assert report["parity"]["max_abs_diff"] <= 1e-4
