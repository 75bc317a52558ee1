"""DPO on packed pairs against one pair a row, and what the reference costs, side by side in one process (CPU, or
the first GPU when there is one).

    python bench/dpo_throughput.py [--pairs 100000] [--steps 8] [key=value ...]

Pairs are shaped like a preference data set's: a prompt of median 150 tokens and two replies of median 120
(log-normal, σ 0.8), both sides together at most train.seq_len. Three ways to batch them (share of real tokens):
  packed                scalelm's: whole pairs next-fit into windows, chosen and rejected two documents of one
  padded to longest     each side a row, a micro-batch padded to its longest side (TRL's concatenated batch)
  padded to seq_len     one pair a row (its two sides as two documents), padded to seq_len
Then the config's model trains DPO (fp32 unless overridden) and prints real tokens per second:
  full, packed / one pair a row     the reference precomputed (as `scalelm score` leaves it), the same engine
  LoRA, packed                      the reference its adapters-off forward pass, which its source runs each step
and the reference's cost: for LoRA, the share of a step its forward-only pass takes (the step timed with and
without it); for full finetuning, scoring a window once (the engine's forward_only) against training on it once.
Prints figures only.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from scalelm.config import load_config
from scalelm.data.chat import ASSISTANT, LAST
from scalelm.data.packing import chat_window, pack
from scalelm.model.build import build_model
from scalelm.objectives import Output, objective_for
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import destroy_distributed, init_distributed
from scalelm.train.optim import AdamW
from scalelm.train.schedule import Schedule
from scalelm.train.sources import InHand, ReferencePass

VOCAB = 8000
LORA = ["finetune.lora.rank=16", "finetune.lora.alpha=32"]


def pair_lengths(n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """(n, 3) prompt, chosen and rejected reply lengths; each pair's two sides together fit seq_len."""
    rng = np.random.default_rng(seed)
    prompt = rng.lognormal(np.log(150), 0.8, n)
    replies = rng.lognormal(np.log(120), 0.8, (n, 2))
    out = np.maximum(np.round(np.column_stack([prompt, replies])), 4).astype(np.int64)
    return out[2 * out[:, 0] + out[:, 1] + out[:, 2] <= seq_len]


def fill(pairs: np.ndarray, seq_len: int, micro: int) -> dict[str, float]:
    sides = np.column_stack([pairs[:, 0] + pairs[:, 1], pairs[:, 0] + pairs[:, 2]])  # (n, 2) side lengths
    windows = len(pack(tuple(int(n) for n in sides.ravel()), seq_len, pairs=True)) - 1
    rows = sides.ravel()
    longest = sum(rows[i:i + 2 * micro].max() * len(rows[i:i + 2 * micro]) for i in range(0, len(rows), 2 * micro))
    return {"packed": sides.sum() / (windows * seq_len), "padded to longest": sides.sum() / longest,
            "padded to seq_len": sides.sum() / (len(pairs) * seq_len)}


def windows(pairs: np.ndarray, seq_len: int, packed: bool, seed: int = 0) -> tuple[list[dict], float]:
    """The windows of these pairs (random tokens, the replies the targets), with random reference log-probs, and
    the real tokens a window holds on average."""
    rng = np.random.default_rng(seed)
    tokens, flags, lengths = [], [], []
    for prompt, *replies in pairs:
        context = rng.integers(4, VOCAB, prompt)
        for n in replies:
            tokens.append(np.concatenate([context, rng.integers(4, VOCAB, n)]))
            flags.append(np.concatenate([np.zeros(prompt, np.uint8), np.full(n, ASSISTANT | LAST, np.uint8)]))
            lengths.append(prompt + n)
    starts = pack(tuple(lengths), seq_len, pairs=True) if packed else np.arange(0, len(lengths) + 1, 2)
    out, real = [], []
    for a, b in zip(starts[:-1], starts[1:]):
        real.append(sum(lengths[a:b]))
        window = chat_window(np.concatenate(tokens[a:b]), np.concatenate(flags[a:b]), np.asarray(lengths[a:b]), seq_len,
                             "assistant")
        window["reference"] = np.zeros(seq_len, np.float32)
        window["reference"][: b - a] = -3.0 * np.asarray(lengths[a:b])
        out.append(window)
    return out, float(np.mean(real))


def batches(rows: list[dict], micro: int, reference: bool):
    keys = [k for k in rows[0] if reference or k != "reference"]
    while True:
        for i in range(0, len(rows) - micro + 1, micro):
            yield {k: torch.from_numpy(np.stack([r[k] for r in rows[i:i + micro]])) for k in keys}


def timed(cfg, rows: list[dict], steps: int, lora: bool, drop_reference_pass: bool = False) -> dict:
    """Median seconds a step over the steps after the first two; for full finetuning also the seconds of scoring
    one step's windows (forward only, as `scalelm score` does)."""
    layout = init_distributed(cfg.parallel, cfg.train.seed)
    try:
        objective = objective_for(cfg, "finetune")
        engine = Engine(cfg, layout, build_model(cfg, layout, VOCAB, documents=True), objective, AdamW(cfg.optim),
                        Schedule(cfg.optim))
        source = batches(rows, cfg.train.micro_batch_size, reference=not lora or drop_reference_pass)
        seconds = []
        for _ in range(steps):
            micro = [next(source) for _ in range(engine.grad_accum)]
            started = time.perf_counter()
            if lora and not drop_reference_pass:  # the reference is the model with its adapters off, each step
                micro = ReferencePass(InHand(micro), engine).take(engine.grad_accum)
            engine.forward_backward(micro)
            engine.optimizer_step()
            if layout.device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        out = {"step_s": float(np.median(seconds[2:]))}
        if not lora:
            micro = [{k: v for k, v in next(source).items() if k != "reference"} for _ in range(engine.grad_accum)]
            started = time.perf_counter()
            engine.forward_only(micro, len(micro), Output.LOGPROBS)
            out["score_s"] = time.perf_counter() - started
        return out
    finally:
        destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--pairs", type=int, default=100_000, help="lengths drawn for the fill figures")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    overrides = ["train.seq_len=1024", "train.micro_batch_size=2", "train.global_batch_size=4", "data.tokenizer=null",
                 f"model.vocab_size={VOCAB}", "train.eval_every=0", "train.precision=fp32", "finetune.objective=dpo",
                 *args.overrides]
    cfg, lora = load_config(args.config, overrides), load_config(args.config, overrides + LORA)
    t = cfg.train
    lens = pair_lengths(args.pairs, t.seq_len)
    print(f"{len(lens):,} pairs, median side {int(np.median(lens[:, 0] + lens[:, 1]))} tokens, windows of {t.seq_len}, "
          f"micro-batches of {t.micro_batch_size}")
    for name, share in fill(lens, t.seq_len, t.micro_batch_size).items():
        print(f"  {name:18s} {100 * share:5.1f}% of window tokens are real")
    few = pair_lengths(t.global_batch_size * (args.steps + 1) * 8, t.seq_len, seed=1)
    (packed, packed_real), (padded, padded_real) = windows(few, t.seq_len, True), windows(few, t.seq_len, False)
    runs = {"full, packed": (packed_real, timed(cfg, packed, args.steps, lora=False)),
            "full, one pair a row": (padded_real, timed(cfg, padded, args.steps, lora=False)),
            "LoRA, packed": (packed_real, timed(lora, packed, args.steps, lora=True)),
            "LoRA, packed, reference handed in": (packed_real, timed(lora, packed, args.steps, lora=True,
                                                                     drop_reference_pass=True))}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    print(f"DPO training, {cfg.model.num_layers} layers x {cfg.model.hidden_size}, {t.precision}, {device}:")
    rate = {name: real * t.global_batch_size / run["step_s"] for name, (real, run) in runs.items()}
    for name, (_, run) in runs.items():
        print(f"  {name:34s} {rate[name]:10,.0f} real tokens/s  ({run['step_s']:.3f} s a step)")
    print(f"  packed / one pair a row (full)     {rate['full, packed'] / rate['full, one pair a row']:10.2f}")
    with_pass, without = runs["LoRA, packed"][1]["step_s"], runs["LoRA, packed, reference handed in"][1]["step_s"]
    print(f"  LoRA's adapters-off reference pass: {100 * (with_pass - without) / with_pass:.1f}% of a step")
    full = runs["full, packed"][1]
    print(f"  full: scoring a step's windows once takes {100 * full['score_s'] / full['step_s']:.1f}% of training on "
          f"them once")


if __name__ == "__main__":
    main()
