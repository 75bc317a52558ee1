"""Loader throughput: tokens/s/core of TokenLoader from tar shards, next to a plain np.memmap reader
of the same tokens, and the loader's share of a tiny-config train step.

    python bench/loader_throughput.py [--tokens 64M] [--seq-len 2048] [--batch 8]

Everything runs in this one process (num_workers=0), so tokens/s is per core. Prints figures only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scalelm.config import load_config
from scalelm.data.loader import TokenLoader
from scalelm.data.shards import ShardSetWriter, parse_size

VOCAB, EOS = 32000, 2


def synthetic_shards(out: Path, tokens: int, shard_size: int) -> np.ndarray:
    """A shard set of random 'documents' (lengths 200-5000 tokens), and the same stream as one array."""
    rng = np.random.default_rng(0)
    stream = rng.integers(4, VOCAB, tokens, dtype=np.uint16)
    ends = np.cumsum(rng.integers(200, 5000, tokens // 200))
    stream[ends[ends < tokens]] = EOS
    writer = ShardSetWriter(out, dtype=np.uint16, vocab_size=VOCAB, eos_id=EOS, shard_size=shard_size,
                            tokenizer={"file": "synthetic", "sha256": "0" * 64}, overwrite=True)
    chunk = 1 << 19  # 512K tokens per sample, as `scalelm shard` writes about
    for i in range(0, tokens, chunk):
        writer.write("train", stream[i : i + chunk], documents=1)
    writer.write("val", stream[:chunk], documents=1)
    writer.close()
    return stream


def time_loader(shards: Path, seq_len: int, batch: int, n_batches: int) -> float:
    """From a cold loader through one epoch: every shard read, parsed and shuffled is on the clock."""
    start = time.perf_counter()
    it = iter(TokenLoader([shards], split="train", seq_len=seq_len, micro_batch_size=batch, seed=0))
    for _ in range(n_batches):
        next(it)
    return n_batches * batch * seq_len / (time.perf_counter() - start)


def time_memmap(path: Path, seq_len: int, batch: int, n_batches: int) -> float:
    """The simplest fast reader: random windows out of one flat memory-mapped file."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    n_windows = (tokens.size - 1) // seq_len
    order = np.random.default_rng(0).permutation(n_windows)
    start = time.perf_counter()
    for b in range(n_batches):
        idx = order[(b * batch) % (n_windows - batch) :][:batch]
        windows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in idx]).astype(np.int64)
        x = torch.from_numpy(windows)
        _inputs, _labels = x[:, :-1], x[:, 1:]
    return n_batches * batch * seq_len / (time.perf_counter() - start)


class TinyDecoder(torch.nn.Module):
    """Plain-PyTorch decoder with the tiny config's shape, to time one train step on this CPU."""

    def __init__(self, vocab: int, layers: int, hidden: int, heads: int, seq_len: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.pos = torch.nn.Embedding(seq_len, hidden)
        layer = torch.nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, batch_first=True,
                                                 norm_first=True, activation="gelu")
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(hidden)
        self.mask = torch.nn.Transformer.generate_square_subsequent_mask(seq_len)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        h = self.blocks(h, mask=self.mask, is_causal=True)
        return self.norm(h) @ self.embed.weight.T  # (B, T, vocab)


def tiny_step_fraction(shards: Path) -> tuple[float, float]:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    m, t = cfg.model, cfg.train
    model = TinyDecoder(8000, m.num_layers, m.hidden_size, m.num_heads, t.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = iter(TokenLoader([shards], split="train", seq_len=t.seq_len, micro_batch_size=t.micro_batch_size))
    batches = [next(loader) for _ in range(30)]
    load_start = time.perf_counter()
    for _ in range(300):
        next(loader)
    load_s = (time.perf_counter() - load_start) / 300
    step_times = []
    for batch in batches:
        start = time.perf_counter()
        logits = model(batch["input_ids"] % 8000)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten() % 8000)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
    step_s = float(np.median(step_times[5:]))
    return load_s, step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=64, help="millions of tokens in the synthetic shard set")
    parser.add_argument("--shard-size", default="32MB", help="shard size (several shards are read on the clock)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    tokens = int(args.tokens * 1e6)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stream = synthetic_shards(tmp / "shards", tokens, shard_size=parse_size(args.shard_size))
        stream.tofile(tmp / "tokens.bin")
        n_batches = tokens // (args.seq_len * args.batch) - 2  # one epoch
        print(f"{tokens / 1e6:.0f}M tokens in {len(list((tmp / 'shards').glob('train-*.tar')))} shard(s); "
              f"seq_len {args.seq_len}, micro-batch {args.batch}, {n_batches} batches, 1 core")
        for name, fn, path in [("TokenLoader (tar shards)", time_loader, tmp / "shards"),
                               ("np.memmap reader", time_memmap, tmp / "tokens.bin")]:
            rates = [fn(path, args.seq_len, args.batch, n_batches) for _ in range(3)]
            print(f"  {name:26s} {max(rates) / 1e6:8.1f} M tokens/s/core (best of 3)")
        load_s, step_s = tiny_step_fraction(tmp / "shards")
        print(f"tiny config (configs/tiny.yaml shape, plain PyTorch, 1 thread): train step {step_s * 1e3:.1f} ms, "
              f"loader {load_s * 1e6:.0f} us per micro-batch = {100 * load_s / step_s:.2f}% of a step")


if __name__ == "__main__":
    main()
