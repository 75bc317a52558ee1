"""Training throughput on this machine's CPU, or its first GPU when it has one: `scalelm pretrain` (one process)
next to a plain-PyTorch loop of the same model, batch and data (under autocast in bf16/fp16), and next to that loop
on a GPT of the same shape written in plain PyTorch (bench/plain_gpt.py). The first ratio is the framework's own
overhead (DeepSpeed engine, loader, metrics), the second adds what megatron-core's layers cost; 1.0 means none.

    python bench/train_throughput.py [--config configs/tiny.yaml] [--steps 40] [key=value ...]

Prints figures only. Tokens/s is the median over the steps after the first five.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scalelm.config import load_config
from scalelm.data.loader import loader_from_config
from scalelm.data.shards import ShardSetWriter
from scalelm.model.gpt import GPT
from scalelm.model.spec import layer_spec, transformer_config
from scalelm.parallel.topology import destroy_distributed, init_distributed
from scalelm.train.loop import pretrain
from scalelm.train.objectives import token_losses
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
        o = cfg.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                      weight_decay=o.weight_decay)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_shards(tmp / "shards", 4_000_000)
        cfg = load_config(args.config, [f"data.train={tmp / 'shards'}", "data.tokenizer=null",
                                        f"model.vocab_size={VOCAB}", f"train.steps={args.steps}", "train.eval_every=0",
                                        f"log.dir={tmp / 'run'}", "log.every=1", "log.tensorboard=false",
                                        "data.num_workers=0", *args.overrides])
        # NOTE: plain, scalelm, plain again: a drift of the machine's speed over the run (caches, other
        # load) then shows as a gap between the two plain figures instead of hiding in the ratio.
        plain_before, own_before = plain_pytorch(cfg, args.steps), plain_pytorch(cfg, args.steps, own_model=True)
        pretrain(cfg)
        records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        ours = statistics.median(r["tokens_per_s"] for r in records[5:])
        mfu = statistics.median(r["mfu"] for r in records[5:]) if records[-1]["mfu"] is not None else None
        own_after, plain_after = plain_pytorch(cfg, args.steps, own_model=True), plain_pytorch(cfg, args.steps)
        plain, own = (plain_before + plain_after) / 2, (own_before + own_after) / 2
    m, t = cfg.model, cfg.train
    print(f"{Path(args.config).name}: {m.num_layers} layers x {m.hidden_size}, seq {t.seq_len}, "
          f"global batch {t.global_batch_size} (micro {t.micro_batch_size}), {t.precision}, "
          + (f"{torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"{torch.get_num_threads()} threads")
          + ", 1 process")
    print(f"  scalelm pretrain     {ours:10,.0f} tokens/s" + (f", MFU {mfu:.1%} (PaLM)" if mfu is not None else ""))
    print(f"  plain PyTorch loop   {plain:10,.0f} tokens/s (before {plain_before:,.0f}, after {plain_after:,.0f}), "
          f"scalelm's GPT")
    print(f"  plain PyTorch GPT    {own:10,.0f} tokens/s (before {own_before:,.0f}, after {own_after:,.0f}), "
          f"torch.nn layers (bench/plain_gpt.py)")
    print(f"  ratio                {ours / plain:10.2f} against the loop, {ours / own:.2f} against the plain GPT")


if __name__ == "__main__":
    main()
