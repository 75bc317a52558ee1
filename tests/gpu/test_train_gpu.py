"""Training on one GPU: bf16 and fp16 (dynamic loss scaling) both learn. Skipped without CUDA."""

import json

import pytest
import torch

from scalelm.config import load_config
from scalelm.train.loop import pretrain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_one_gpu_learns(pipeline, tmp_path, monkeypatch, precision):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config("configs/tiny.yaml", [
        f"data.train={pipeline['shards']}", f"data.tokenizer={pipeline['tokenizer']}", f"log.dir={tmp_path}",
        "train.seq_len=64", "train.steps=40", "train.eval_every=0", f"train.precision={precision}",
        "optim.warmup_steps=5", "log.every=1", "data.num_workers=0"])
    last = pretrain(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and last["loss"] < 0.8 * losses[0]
    assert last["mem"] > 0
