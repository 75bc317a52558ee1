"""Checkpoint save and load throughput on this machine's disk, for the GPT-3 125M weights (one process, CPU),
next to plain `torch.save` / `torch.load` of the same tensors and to the disk's own write speed.

    python bench/checkpoint_throughput.py [--config configs/gpt3-125m.yaml] [--repeats 3] [--dir DIR] [key=value ...]

A checkpoint holds the fp32 weights and AdamW's two moments: 12 bytes per parameter (1.5 GB for
125M), plus a few KB of RNG and loader state. Every figure includes fsync, since a checkpoint that
is not on disk is not a checkpoint. Saving is synchronous, so "training blocked" is the whole save.
Loading includes the SHA-256 verification a resume does. Reads come from the page cache unless it
can be dropped (root on Linux): the script says which. Prints figures only; medians of the repeats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import synthetic_shards  # noqa: E402

from scalelm.checkpoint.resume import find_checkpoint, load_checkpoint  # noqa: E402
from scalelm.checkpoint.save import save_checkpoint  # noqa: E402
from scalelm.config import load_config, validate  # noqa: E402
from scalelm.data.loader import loader_from_config  # noqa: E402
from scalelm.model.build import build_model  # noqa: E402
from scalelm.parallel.engine import Engine  # noqa: E402
from scalelm.parallel.state import KEYS  # noqa: E402
from scalelm.parallel.topology import destroy_distributed, init_distributed  # noqa: E402

VOCAB = 50257  # GPT-2's, as GPT-3 has it


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def fsynced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpt3-125m.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="scalelm-bench-"))
    try:
        synthetic_shards(root / "shards", 1 << 20)
        cfg = load_config(args.config, ["train.precision=fp32", f"model.vocab_size={VOCAB}", f"data.train=[{root / 'shards'}]",
                                        "data.tokenizer=null", "data.num_workers=0", f"log.dir={root / 'run'}",
                                        "train.micro_batch_size=1", "train.global_batch_size=1", *args.overrides])
        validate(cfg, world_size=1)
        layout = init_distributed(cfg.parallel, cfg.train.seed)
        try:
            run(cfg, layout, root, args.repeats)
        finally:
            destroy_distributed()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(cfg, layout, root: Path, repeats: int) -> None:
    started = time.perf_counter()
    engine = Engine(cfg, layout, build_model(cfg, layout, VOCAB))
    loader = loader_from_config(cfg, "train", 0, 1)
    params = sum(p.numel() for _, p in engine.named_parameters())
    print(f"model: {cfg.model.num_layers} layers x {cfg.model.hidden_size}, {params / 1e6:.1f}M parameters "
          f"(built in {time.perf_counter() - started:.1f} s); checkpoint dir on {root}")

    tensors = {f"{key}/{name}": engine.gather(p, key).clone() for name, p in engine.named_parameters() for key in KEYS}
    size = cold = 0

    def ours(i: int) -> tuple:
        nonlocal size, cold
        done = save_checkpoint(cfg, layout, engine, i + 1, {"step": i + 1}, loader.state_dict(), None)
        size = done["bytes"]
        cold = drop_page_cache()
        started = time.perf_counter()
        ckpt, manifest, _ = find_checkpoint(cfg, layout)  # verifies every file's SHA-256
        load_checkpoint(cfg, layout, engine, loader, ckpt, manifest, None)
        return done["seconds"], time.perf_counter() - started

    def plain(i: int) -> tuple:
        path = root / f"plain-{i}.pt"  # a new file each time, as a checkpoint is
        started = time.perf_counter()
        fsynced(path, lambda f: torch.save(tensors, f))
        saved = time.perf_counter() - started
        drop_page_cache()
        started = time.perf_counter()
        torch.load(path, weights_only=True)
        return saved, time.perf_counter() - started

    def raw(i: int) -> tuple:
        """The same tensors' bytes, written one after the other: the disk's ceiling for them."""
        started = time.perf_counter()
        fsynced(root / f"raw-{i}.bin", lambda f: [f.write(t.reshape(-1).view(torch.uint8).numpy()) for t in tensors.values()])
        return time.perf_counter() - started, None

    writers = {"scalelm": ours, "torch": plain, "raw": raw}
    times: dict[str, list] = {name: [] for name in writers}
    # NOTE: round 0 warms up and is not counted. The writers take turns in a rotating order: this
    # VM's disk writes in bursts, and whoever writes right after another writer pays for its flush.
    for i in range(repeats + 1):
        names = list(writers)[i % 3:] + list(writers)[: i % 3]
        for name in names:
            result = writers[name](i)
            if i:
                times[name].append(result)
    torch_size = (root / "plain-0.pt").stat().st_size

    def row(name: str, nbytes: int, seconds: list[float]) -> str:
        s = statistics.median(seconds)
        return f"  {name:<34} {nbytes / 1e9:6.2f} GB  {s:6.2f} s  {nbytes / s / 1e9:6.2f} GB/s"

    print(f"save (fsync'd; training is blocked for all of it), median of {repeats}:")
    print(row("scalelm save_checkpoint", size, [t[0] for t in times["scalelm"]]))
    print(row("torch.save of the same tensors", torch_size, [t[0] for t in times["torch"]]))
    print(row("raw write of the same bytes", torch_size, [t[0] for t in times["raw"]]))
    print(f"load ({'cold: page cache dropped' if cold else 'warm: page cache not dropped (needs root)'}):")
    print(row("scalelm resume (verify + load)", size, [t[1] for t in times["scalelm"]]))
    print(row("torch.load(weights_only=True)", torch_size, [t[1] for t in times["torch"]]))


if __name__ == "__main__":
    main()
