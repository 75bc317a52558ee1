"""`scalelm plan`'s GPU memory model against the CUDA allocator's peak on one GPU: within 20%, for bf16 and
fp32, ZeRO-1 and 2, with and without full recomputation. Skipped without CUDA. (The CPU side of the model is
checked in tests/parallel/test_plan_memory.py.)"""

import gc

import pytest
import torch

from scalelm.parallel.plan import plan
from tests.helpers.workloads import step, tiny_config, training_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 32000
# 134M parameters, 4 sequences of 1024 per micro-batch: weights, optimizer, activations and the loss all count
MODEL = ["model.num_layers=8", "model.hidden_size=1024", "model.num_heads=16", "train.seq_len=1024",
         "train.micro_batch_size=4", "train.global_batch_size=8"]


@pytest.mark.parametrize("extra", [
    ["train.precision=bf16"],
    ["train.precision=bf16", "train.activation_checkpointing=full"],
    ["train.precision=bf16", "parallel.zero_stage=2"],
    ["train.precision=fp32"],
], ids=["bf16-zero1", "bf16-zero1-recompute", "bf16-zero2", "fp32-zero1"])
def test_planned_gpu_memory_is_within_20_percent_of_the_allocators_peak(extra, monkeypatch):
    from scalelm.model.build import build_model
    from scalelm.parallel.topology import destroy_distributed, init_distributed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = tiny_config(MODEL + extra)
    cfg.model.vocab_size = VOCAB
    layout = init_distributed(cfg.parallel, 0)
    try:
        t = cfg.train
        tokens = torch.randint(0, VOCAB, (2 * t.global_batch_size, t.seq_len + 1), generator=torch.Generator().manual_seed(0))
        batches = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in tokens.split(t.micro_batch_size)]
        gc.collect()  # an earlier case's engine, in reference cycles, must not be freed during this one
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine = training_engine(cfg, layout, build_model(cfg, layout, VOCAB))
        for i in range(2):
            step(engine, batches[i * engine.grad_accum:(i + 1) * engine.grad_accum])
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
        del engine
        gc.collect()
    finally:
        destroy_distributed()
        torch.cuda.empty_cache()
    memory = plan(cfg, 1, on_gpu=True).memory
    report = (f"{' '.join(extra)}: planned {memory.total / 2**20:,.0f} MiB (held {memory.held_bytes / 2**20:,.0f} + "
              f"{memory.peak_moment} {memory.moment_bytes(memory.peak_moment) / 2**20:,.0f}), "
              f"measured {measured / 2**20:,.0f} MiB, ratio {memory.total / measured:.2f}")
    print(report)
    assert memory.total == pytest.approx(measured, rel=0.2), report
