"""Training throughput on this machine's CPU, or its first GPU when it has one: `scalelm pretrain` (one process)
next to a plain-PyTorch loop of the same model, batch and data (under autocast in bf16/fp16), and next to that loop
on a GPT of the same shape written in plain PyTorch (bench/plain_gpt.py). The first ratio is the framework's own
overhead (DeepSpeed engine, loader, metrics), the second adds what megatron-core's layers cost; 1.0 means none.

    python bench/train_throughput.py [--shapes tiny,6x256,125m] [--precisions fp32,bf16] [--steps N] [key=value ...]

Shapes: tiny (configs/tiny.yaml: 4 layers x 192, seq 128), 6x256 (6 layers x 256, seq 256) and 125m
(configs/gpt3-125m.yaml at seq 512, batch 2 x 1). key=value overrides apply to every shape. Prints one row per
shape and precision; tokens/s is the median over the steps after the first five (of 40, 30 and 10 by default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scalelm.config import load_config
from scalelm.data.loader import loader_from_config
from scalelm.data.shards import ShardSetWriter
from scalelm.model.gpt import GPT
from scalelm.model.spec import layer_spec, transformer_config
from scalelm.objectives.tokens import token_losses
from scalelm.parallel.topology import destroy_distributed, init_distributed
from scalelm.train.loop import pretrain
from scalelm.train.schedule import lr_scheduler

sys.path.insert(0, str(Path(__file__).parent))
from plain_gpt import PlainGPT  # noqa: E402

VOCAB = 8000


def synthetic_shards(out: Path, tokens: int) -> None:
    stream = np.random.default_rng(0).integers(4, VOCAB, tokens, dtype=np.uint16)
    writer = ShardSetWriter(out, dtype=np.uint16, vocab_size=VOCAB, eos_id=2, shard_size=8 << 20,
                            tokenizer={"file": "synthetic", "sha256": "0" * 64}, overwrite=True)
    for i in range(0, tokens, 1 << 18):
        writer.write("train", stream[i : i + (1 << 18)], documents=1)
    writer.write("val", stream[: 1 << 18], documents=1)
    writer.close()


def plain_pytorch(cfg, steps: int, own_model: bool = False) -> float:
    """AdamW, the schedule, clipping and the loader driven by hand, no DeepSpeed, on scalelm's GPT (megatron-core
    layers) or, with `own_model`, on bench/plain_gpt.py's GPT of the same shape (torch.nn layers)."""
    layout = init_distributed(cfg.parallel, cfg.train.seed)
    try:
        device, on_gpu = layout.device, layout.device.type == "cuda"
        if own_model:
            torch.manual_seed(cfg.train.seed)
            model = PlainGPT(cfg.model, VOCAB, cfg.train.seq_len).to(device)
        else:
            tc = transformer_config(cfg.model, cfg.parallel, on_gpu=on_gpu)
            model = GPT(cfg.model, tc, layer_spec(on_gpu=on_gpu), VOCAB, cfg.train.seed).to(device)

        def losses(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if own_model:  # (b, s, V) logits
                return F.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten())
            return token_losses(model(ids), labels).mean()  # (s, b, V) logits
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)  # fp16: no loss scaling, speed only
        if half is not None and not own_model and not on_gpu:
            # NOTE: megatron's linear layers leave autocast in their backward on the CPU (it re-enters only CUDA's),
            # so here the loop trains half-precision weights themselves: less work than scalelm's fp32 master copies
            model, half = model.to(half), None
        o = cfg.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                      weight_decay=o.weight_decay, fused=True)  # as scalelm's
        scheduler = lr_scheduler(optimizer, o)
        batches = iter(loader_from_config(cfg, "train", layout.dp_rank, layout.data))
        accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
        rates = []
        for _ in range(steps):
            start = time.perf_counter()
            for _ in range(accum):
                batch = next(batches)
                with torch.autocast(device.type, dtype=half, enabled=half is not None):
                    loss = losses(batch["input_ids"].to(device), batch["labels"].to(device))
                (loss / accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if on_gpu:
                torch.cuda.synchronize()
            rates.append(cfg.train.global_batch_size * cfg.train.seq_len / (time.perf_counter() - start))
        return statistics.median(rates[5:])
    finally:
        destroy_distributed()


# name: (config, overrides, steps)
SHAPES = {"tiny": ("tiny.yaml", [], 40),
          "6x256": ("tiny.yaml", ["model.num_layers=6", "model.hidden_size=256", "model.num_heads=8", "train.seq_len=256"], 30),
          "125m": ("gpt3-125m.yaml", ["train.seq_len=512", "train.micro_batch_size=1", "train.global_batch_size=2"], 10)}


def measure(config: Path, overrides: list[str], steps: int, tmp: Path, run: Path) -> tuple:
    """(config, scalelm eager and compiled, plain loop, plain GPT tokens/s, each plain figure (before, after))."""
    cfg = load_config(config, [f"data.train={tmp / 'shards'}", "data.tokenizer=null", f"model.vocab_size={VOCAB}",
                               f"train.steps={steps}", "train.eval_every=0", f"log.dir={run}", "log.every=1",
                               "log.tensorboard=false", "data.num_workers=0", "train.resume=none",
                               *overrides])
    # NOTE: plain, scalelm, plain again: a drift of the machine's speed over the run (caches, other
    # load) then shows as a gap between the two plain figures instead of hiding in the ratio.
    loop, own = [plain_pytorch(cfg, steps)], [plain_pytorch(cfg, steps, own_model=True)]
    ours = [scalelm(cfg, run), scalelm(replace(cfg, train=replace(cfg.train, compile=True)), run.with_name(run.name + "-compiled"))]
    own.append(plain_pytorch(cfg, steps, own_model=True))
    loop.append(plain_pytorch(cfg, steps))
    return cfg, ours, statistics.mean(loop), statistics.mean(own), (loop, own)


def scalelm(cfg, run: Path) -> float:
    """`scalelm pretrain`'s median tokens/s after the first five steps."""
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its progress lines
        pretrain(replace(cfg, log=replace(cfg.log, dir=str(run)), checkpoint=replace(cfg.checkpoint, dir=str(run / "checkpoints"))))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=None, help="steps of every run (default: the shape's)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    configs = Path(__file__).parents[1] / "configs"
    print(("GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads")
          + ", 1 process; tokens/s (plain figures: the mean of a run before scalelm's and one after)")
    print(f"  {'shape':<30} {'precision':<9} {'scalelm':>9} {'plain loop':>11} {'plain GPT':>10}  "
          f"{'vs loop':>7} {'vs GPT':>7}  {'compiled':>9} {'vs GPT':>7}  plain runs (loop; GPT)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_shards(tmp / "shards", 4_000_000)
        for shape in args.shapes.split(","):
            config, overrides, steps = SHAPES[shape]
            for precision in args.precisions.split(","):
                cfg, (ours, compiled), loop, own, (loops, owns) = measure(
                    configs / config, [*overrides, f"train.precision={precision}", *args.overrides], args.steps or steps, tmp,
                    tmp / f"{shape}-{precision}")
                m, t = cfg.model, cfg.train
                name = f"{shape}: {m.num_layers}x{m.hidden_size}, seq {t.seq_len}, batch {t.global_batch_size}"
                print(f"  {name:<30} {precision:<9} {ours:9,.0f} {loop:11,.0f} {own:10,.0f}  {ours / loop:7.2f} "
                      f"{ours / own:7.2f}  {compiled:9,.0f} {compiled / own:7.2f}  "
                      f"{' '.join(f'{x:,.0f}' for x in loops)}; {' '.join(f'{x:,.0f}' for x in owns)}", flush=True)


if __name__ == "__main__":
    main()
