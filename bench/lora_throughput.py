"""LoRA against full finetuning of the same model, side by side in one process (CPU, or the first GPU when there
is one): what each trains, holds in its optimizer, peaks at in memory during a step, writes to a checkpoint, and
how fast it trains. Ratios are LoRA / full.

    python bench/lora_throughput.py [--config configs/gpt3-125m.yaml] [--steps 5] [--rank 16] [--quick] [key=value ...]

Three runs of the config's model (seq 256, batch 4, fp32 unless overridden): full finetuning; LoRA rank r, alpha 2r,
on qkv+proj (finetune.lora's default targets); and the same on all four linears (qkv, proj, fc1, fc2). They train on
random tokens (no data loader: the model's own cost). Each is built in turn, trains a warmup step and a measured
one, and saves a checkpoint, the runs before it idle; then all take --steps timed steps in turns.
  optimizer state    bytes of the tensors the optimizer holds: AdamW's moments (its `state`) and DeepSpeed's fp32
                     master copies (the tensors it hands AdamW in place of the model's own parameters)
  peak memory        of the measured step: the kernel's high-water mark of the resident set (VmHWM, reset after
                     the warmup step) above the resident set just before the model was built, file pages left out
                     (as tests/helpers/workloads.py::peak_memory): weights, gradients, optimizer state and the
                     step's activations. On a GPU, torch.cuda.max_memory_allocated above what was allocated before
  checkpoint         bytes in the step directory save_checkpoint writes, and its time (fsync'd). A LoRA checkpoint
                     holds the adapters and their moments only, and names the full run's checkpoint as its base
  tokens/s           median over the timed steps
The LoRA runs start from the same random initialisation, not the full run's weights: no figure depends on the
values. --quick is a toy model for the tests. Prints figures only.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository, for tests.helpers' memory readings

from scalelm.checkpoint.run_state import RunState
from scalelm.checkpoint.save import save_checkpoint
from scalelm.config import load_config, validate
from scalelm.model.build import build_model
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import destroy_distributed, init_distributed
from tests.helpers.workloads import memory_status, pin_mmap_threshold, reset_peak, step, training_engine

VOCAB = 50257  # GPT-2's, as GPT-3 has it
QUICK = ["model.num_layers=2", "model.hidden_size=128", "model.num_heads=4", "train.seq_len=64"]
QUICK_VOCAB = 8000
FULL = "full finetuning"


def optimizer_bytes(engine: Engine) -> tuple[int, int]:
    """(AdamW's moments, DeepSpeed's fp32 master copies) in bytes, from the optimizer itself."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's ZeRO / bf16 wrapper -> AdamW
    moments = sum(v.nbytes for s in inner.state.values() for v in s.values() if torch.is_tensor(v))
    own = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    masters = sum(p.nbytes for g in inner.param_groups for p in g["params"] if p.untyped_storage().data_ptr() not in own)
    return moments, masters


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def peak_bytes(device: torch.device, before: dict) -> int:
    """How far memory rose above `before` (memory_status() or CUDA's allocated bytes) at its peak since reset_peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - before["allocated"]
    now = memory_status()
    return now["VmHWM"] - (now["RssFile"] - before["RssFile"]) - before["VmRSS"]


def prepare(cfg, layout, vocab: int, steps: int) -> dict:
    """Build one run's engine and train a warmup step and a measured one, then save: its figures but tokens/s.
    The engine stays (with batches for `steps` more steps) for the timed rounds."""
    t = cfg.train
    tokens = torch.randint(0, vocab, ((steps + 2) * t.global_batch_size, t.seq_len + 1), generator=torch.Generator().manual_seed(0))
    micro = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in tokens.split(t.micro_batch_size)]
    accum = t.global_batch_size // (t.micro_batch_size * layout.data)
    batches = iter([micro[i:i + accum] for i in range(0, len(micro), accum)])  # each step's micro-batches
    del tokens
    gc.collect()
    before = memory_status() | {"allocated": torch.cuda.memory_allocated() if layout.device.type == "cuda" else 0}
    engine = training_engine(cfg, layout, build_model(cfg, layout, vocab))
    params = [p for _, p in engine.named_parameters()]
    moments, masters = optimizer_bytes(engine)
    step(engine, next(batches))  # warmup: whatever the first step allocates for good is then in the baseline of the peak
    gc.collect()
    reset_peak()
    if layout.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(layout.device)
    step(engine, next(batches))
    peak = peak_bytes(layout.device, before)
    done = save_checkpoint(cfg, layout, engine, 2, RunState(step=2), None, None)
    return {"engine": engine, "batches": batches, "tokens": t.global_batch_size * t.seq_len, "rates": [],
            "trainable": sum(p.numel() for p in params if p.requires_grad), "params": sum(p.numel() for p in params),
            "moments": moments, "masters": masters, "optimizer": moments + masters, "peak": peak,
            "ckpt_bytes": dir_bytes(Path(done["path"])), "ckpt_seconds": done["seconds"], "path": done["path"]}


def timed_rounds(results: dict, steps: int, device: torch.device) -> None:
    """`steps` rounds of one step of each run, in a rotating order, so that the machine's drifting speed (other
    load, caches) falls on every run alike; each run's median tokens/s."""
    for i in range(steps):
        names = list(results)[i % len(results):] + list(results)[: i % len(results)]
        for name in names:
            r = results[name]
            started = time.perf_counter()
            step(r["engine"], next(r["batches"]))
            if device.type == "cuda":
                torch.cuda.synchronize()
            r["rates"].append(r["tokens"] / (time.perf_counter() - started))
    for r in results.values():
        r["tokens_per_s"] = statistics.median(r["rates"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" / "gpt3-125m.yaml"))
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each run) after the warmup")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help=f"a toy model ({', '.join(QUICK)}, vocab {QUICK_VOCAB}) for the tests")
    parser.add_argument("--dir", type=Path, default=None, help="where to write checkpoints (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    # glibc would otherwise raise its mmap threshold to the largest block freed so far and keep freed tensors
    # resident in its heap, where they would count in the next run's peak though nothing holds them
    pin_mmap_threshold()
    vocab = QUICK_VOCAB if args.quick else VOCAB
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="scalelm-bench-"))
    common = ["train.precision=fp32", "train.seq_len=256", "train.micro_batch_size=4", "train.global_batch_size=4",
              "train.eval_every=0", "data.tokenizer=null", f"model.vocab_size={vocab}", "data.num_workers=0",
              f"log.dir={root / 'log'}", *(QUICK if args.quick else []), *args.overrides]
    lora = [f"finetune.lora.rank={args.rank}", f"finetune.lora.alpha={2 * args.rank}"]
    runs = {FULL: ("full", []), "LoRA qkv,proj": ("qkv-proj", [*lora, "finetune.lora.targets=[qkv,proj]"]),
            "LoRA all four": ("all-four", [*lora, "finetune.lora.targets=[qkv,proj,fc1,fc2]"])}
    cfgs = {}
    for name, (where, extra) in runs.items():
        base = [f"train.init_from={root / 'full'}"] if extra else []  # a LoRA checkpoint names the full run's as its base
        cfgs[name] = validate(load_config(args.config, [*common, f"checkpoint.dir={root / where}", *base, *extra]), world_size=1)
    try:
        # NOTE: the runs are built one after the other and each measured on its own (memory, checkpoint), the
        # ones before it idle; then they take timed steps in turn. The engines stay, so a step never runs
        # right after another run's engine was freed.
        layout = init_distributed(cfgs[FULL].parallel, cfgs[FULL].train.seed)
        try:
            results = {name: prepare(cfg, layout, vocab, args.steps) for name, cfg in cfgs.items()}
            timed_rounds(results, args.steps, layout.device)
        finally:
            destroy_distributed()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(args, cfgs[FULL], vocab, layout.device, results)


def report(args, cfg, vocab: int, device: torch.device, results: dict) -> None:
    m, t = cfg.model, cfg.train
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{Path(args.config).name}{' --quick' if args.quick else ''}: {m.num_layers} layers x {m.hidden_size}, vocab {vocab}, "
          f"seq {t.seq_len}, global batch {t.global_batch_size} (micro {t.micro_batch_size}), {t.precision}, "
          f"ZeRO-{cfg.parallel.zero_stage}, {where}, 1 process; LoRA rank {args.rank}, alpha {2 * args.rank}; "
          f"tokens/s: median of {args.steps} steps each, taken in turns, after a warmup and a measured step")

    def mb(n: float) -> str:
        return f"{n / 1e6:,.2f} MB"

    rows = [("trainable parameters", "trainable", lambda r: f"{r['trainable']:,} ({r['trainable'] / r['params']:.2%})"),
            ("optimizer state", "optimizer", lambda r: mb(r["optimizer"])),
            ("  AdamW moments", "moments", lambda r: mb(r["moments"])),
            ("  fp32 master copies", "masters", lambda r: mb(r["masters"])),
            ("peak memory of a step", "peak", lambda r: mb(r["peak"])),
            ("checkpoint size", "ckpt_bytes", lambda r: mb(r["ckpt_bytes"])),
            ("checkpoint save time", "ckpt_seconds", lambda r: f"{r['ckpt_seconds']:.2f} s"),
            ("tokens/s", "tokens_per_s", lambda r: f"{r['tokens_per_s']:,.0f}")]
    full = results[FULL]
    print(f"  {'':23}" + "".join(f"{name:>23}" + ("" if name == FULL else f"{'LoRA/full':>11}") for name in results))
    for label, key, show in rows:
        cells = []
        for name, r in results.items():
            cells.append(f"{show(r):>23}")
            if name != FULL:
                cells.append(f"{r[key] / full[key]:11.4f}" if full[key] else f"{'-':>11}")
        print(f"  {label:<23}" + "".join(cells))
    if device.type == "cuda":
        print("  (peak memory on the GPU: torch.cuda.max_memory_allocated above what was allocated before the build)")


if __name__ == "__main__":
    main()
