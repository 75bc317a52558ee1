"""`scalelm pretrain` end to end on shards the tests make: one process, two ranks, bf16, bad layouts."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from scalelm.config import load_config
from scalelm.errors import ConfigError
from scalelm.train.loop import pretrain
from scalelm.train.plot import plot_run

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=32",
        "train.micro_batch_size=4", "train.global_batch_size=8", "data.num_workers=0", "train.eval_iters=2"]


def overrides(pipeline, tmp_path, *extra: str) -> list[str]:
    return [f"data.train={pipeline['shards']}", f"data.tokenizer={pipeline['tokenizer']}",
            f"log.dir={tmp_path / 'run'}", *TINY, *extra]


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_learns(pipeline, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config("configs/tiny.yaml", overrides(pipeline, tmp_path, "train.steps=60", "train.eval_every=30",
                                                      "optim.warmup_steps=10", "log.every=1"))
    last = pretrain(cfg)
    steps = [r for r in records(tmp_path) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert last["loss"] < 0.75 * steps[0]["loss"]  # well below where it started
    assert last["val_loss"] < 0.8 * steps[0]["loss"] and last["val_perplexity"] > 1
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["mfu"] is None for r in steps)
    assert (tmp_path / "run" / "config.yaml").exists() and any((tmp_path / "run" / "tensorboard").iterdir())
    assert plot_run(tmp_path / "run", tmp_path / "loss.png").stat().st_size > 10_000


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "scalelm", *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=600)


def test_two_local_ranks_in_bf16(pipeline, tmp_path):
    result = run_cli("pretrain", "--config", "configs/tiny.yaml", "--nproc-per-node", "2",
                     *overrides(pipeline, tmp_path, "train.steps=12", "train.precision=bf16", "train.eval_every=0",
                                "optim.warmup_steps=2", "log.every=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in records(tmp_path)]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert result.stdout.count("done: step 12") == 1  # rank 0 speaks for the run


@pytest.mark.parametrize("world, extra, message", [
    ("3", ["parallel.tensor=2"], "world size 3 does not divide by parallel.tensor x parallel.pipeline = 2"),
    ("2", ["train.global_batch_size=6", "train.micro_batch_size=4"], "is not a multiple of"),
])
def test_layout_errors_come_before_any_process_group(pipeline, tmp_path, world, extra, message):
    # WORLD_SIZE says 3 ranks, but only this one runs: the error must come before it waits for the others.
    result = run_cli("pretrain", "--config", "configs/tiny.yaml", *overrides(pipeline, tmp_path, *extra),
                     env={"WORLD_SIZE": world, "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("scalelm: error: ")


def test_vocab_size_must_match_the_tokenizer(pipeline, tmp_path):
    cfg = load_config(None, overrides(pipeline, tmp_path, "model.vocab_size=999"))
    with pytest.raises(ConfigError, match="model.vocab_size=999 but data.tokenizer has 400 pieces"):
        pretrain(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU fp16 trains: tests/gpu/test_train_gpu.py")
def test_fp16_on_a_cpu_is_a_clear_error(pipeline, tmp_path):
    cfg = load_config(None, overrides(pipeline, tmp_path, "train.precision=fp16"))
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a GPU"):
        pretrain(cfg)


def test_document_mask_keeps_the_documents_of_a_window_apart(pipeline, tmp_path):
    from scalelm.data.loader import loader_from_config

    cfg = load_config(None, overrides(pipeline, tmp_path, "train.steps=4", "train.eval_every=0", "optim.warmup_steps=1",
                                      "log.every=1", "data.document_mask=true", "train.precision=fp32", "train.seq_len=128"))
    batches = itertools.islice(loader_from_config(cfg), 8)
    assert any(b["document_ids"].max() > 0 for b in batches)  # some windows hold several documents
    pretrain(cfg)
    masked = [r["loss"] for r in records(tmp_path)]
    cfg = load_config(None, overrides(pipeline, tmp_path, "train.steps=4", "train.eval_every=0", "optim.warmup_steps=1",
                                      "log.every=1", "train.resume=none", f"checkpoint.dir={tmp_path / 'plain'}",
                                      "train.precision=fp32", "train.seq_len=128"))
    pretrain(cfg)
    plain = [r["loss"] for r in records(tmp_path)]
    assert masked[-1] < masked[0] and masked != plain  # it trains, and attends otherwise than across documents


def test_compiled_layers_train_as_the_eager_ones(pipeline, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    from torch._dynamo.utils import counters

    losses = {}
    for compiled in (False, True):
        run = tmp_path / str(compiled)
        cfg = load_config("configs/tiny.yaml", overrides(pipeline, run, "train.steps=4", "train.eval_every=0", "log.every=1",
                                                          "train.precision=fp32", "log.tensorboard=false",
                                                          f"train.compile={str(compiled).lower()}") + [f"log.dir={run}"])
        pretrain(cfg)
        losses[compiled] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses[True]) == 4 and counters["stats"]["unique_graphs"] > 0  # compiled, not run eagerly
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
