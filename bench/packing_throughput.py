"""SFT packing against padding: the share of real tokens in the windows, and training target tokens/s, side by side.

    python bench/packing_throughput.py [--conversations 100000] [--steps 12] [key=value ...]

Conversation lengths follow a chat data set's shape: log-normal with a median of 300 tokens (σ 0.9), at least
16 and at most train.seq_len. Three ways to batch them:
  packed                scalelm's: whole conversations next-fit into windows of seq_len, each attended on its own
  padded to longest     one conversation a row, each micro-batch padded to its longest (what most trainers do)
  padded to seq_len     one conversation a row, every row padded to seq_len
Then one process trains the config's model on packed windows and on rows padded to seq_len (the same engine
and objective; the padded rows need no document mask) and prints target tokens per second for each, and their
ratio (CPU, or the first GPU when there is one). Prints figures only.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from scalelm.config import load_config
from scalelm.data.chat import ASSISTANT
from scalelm.data.packing import chat_window, pack
from scalelm.model.build import build_model
from scalelm.objectives.next_token import SFT
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import destroy_distributed, init_distributed
from scalelm.train.optim import AdamW
from scalelm.train.schedule import Schedule

VOCAB = 8000


def lengths(n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(300), 0.9, n)), 16, seq_len).astype(np.int64)


def fill(lens: np.ndarray, seq_len: int, micro: int) -> dict[str, float]:
    """Real tokens / window tokens for each way of batching."""
    starts = pack(tuple(int(n) for n in lens), seq_len)
    longest = [lens[i:i + micro].max() * len(lens[i:i + micro]) for i in range(0, len(lens), micro)]
    return {"packed": lens.sum() / ((len(starts) - 1) * seq_len), "padded to longest": lens.sum() / sum(longest),
            "padded to seq_len": lens.sum() / (len(lens) * seq_len)}


def conversation(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and flags of a made-up conversation: its second half is the assistant's."""
    ids = rng.integers(4, VOCAB, n)
    flags = np.zeros(n, np.uint8)
    flags[n // 2:] = ASSISTANT
    return ids, flags


def batches(lens: np.ndarray, seq_len: int, micro: int, packed: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    convs = [conversation(rng, int(n)) for n in lens]
    if packed:
        starts = pack(tuple(int(n) for n in lens), seq_len)
        rows = [chat_window(np.concatenate([c[0] for c in convs[a:b]]), np.concatenate([c[1] for c in convs[a:b]]),
                            lens[a:b], seq_len, "assistant") for a, b in zip(starts[:-1], starts[1:])]
    else:
        rows = []
        for ids, flags in convs:
            window = chat_window(ids, flags, np.asarray([len(ids)]), seq_len, "assistant")
            rows.append({k: window[k] for k in ("input_ids", "labels", "loss_mask")})  # one conversation: causal is enough
    for i in range(0, len(rows) - micro + 1, micro):
        yield {k: torch.from_numpy(np.stack([r[k] for r in rows[i:i + micro]])) for k in rows[i]}


def train_rate(cfg, lens: np.ndarray, packed: bool, steps: int) -> float:
    """Median target tokens/s over the steps after the first two."""
    layout = init_distributed(cfg.parallel, cfg.train.seed)
    try:
        engine = Engine(cfg, layout, build_model(cfg, layout, VOCAB, documents=packed), SFT(), AdamW(cfg.optim),
                        Schedule(cfg.optim))
        source, rates = batches(lens, cfg.train.seq_len, cfg.train.micro_batch_size, packed), []
        for _ in range(steps):
            started = time.perf_counter()
            outcome = engine.forward_backward([next(source) for _ in range(engine.grad_accum)])
            engine.optimizer_step()
            if layout.device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(outcome.units / (time.perf_counter() - started))
        return float(np.median(rates[2:]))
    finally:
        destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--conversations", type=int, default=100_000, help="lengths drawn for the fill figures")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cfg = load_config(args.config, ["train.seq_len=1024", "train.micro_batch_size=4", "train.global_batch_size=4",
                                    "data.tokenizer=null", f"model.vocab_size={VOCAB}", "train.eval_every=0",
                                    *args.overrides])
    t = cfg.train
    lens = lengths(args.conversations, t.seq_len)
    print(f"{args.conversations:,} conversations, median {int(np.median(lens))} tokens, windows of {t.seq_len}, "
          f"micro-batches of {t.micro_batch_size}")
    for name, share in fill(lens, t.seq_len, t.micro_batch_size).items():
        print(f"  {name:18s} {100 * share:5.1f}% of window tokens are real")
    few = lengths(t.micro_batch_size * (args.steps + 1) * 4, t.seq_len, seed=1)
    packed, padded = (train_rate(cfg, few, p, args.steps) for p in (True, False))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    print(f"SFT training, {cfg.model.num_layers} layers x {cfg.model.hidden_size}, {t.precision}, {device}:")
    print(f"  packed             {packed:10,.0f} target tokens/s")
    print(f"  padded to seq_len  {padded:10,.0f} target tokens/s")
    print(f"  ratio              {packed / padded:10.2f}")


if __name__ == "__main__":
    main()
