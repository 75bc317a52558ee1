"""Checkpoint save and load throughput on this machine's disk, for the GPT-3 125M weights (one process, CPU),
next to plain `torch.save` / `torch.load` of the same tensors and to the disk's own write speed.

    python bench/checkpoint_throughput.py [--config configs/gpt3-125m.yaml] [--repeats 3] [--dir DIR] [key=value ...]

A checkpoint holds the fp32 weights and AdamW's two moments: 12 bytes per parameter (1.5 GB for
125M), plus a few KB of RNG and loader state. Every figure includes fsync, since a checkpoint that
is not on disk is not a checkpoint. A blocking save (checkpoint.background=false) blocks training for
all of it; a save in the background (the default) for its snapshot to host memory only, and the
write that follows is timed on its own (here nothing trains beside it). Loading includes the SHA-256
verification a resume does. Reads come from the page cache unless it
can be dropped (root on Linux): the script says which. Prints figures only; medians of the repeats.

Every writer starts with its last file out of the page cache: a checkpoint's files leave it once they are
durable (checkpoint/store.py), torch.save's and the raw write's are deleted. On this VM, writing into pages
that were never used before is 3-4x slower, which would otherwise decide who wins.
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
from concurrent.futures import wait as joined
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import synthetic_shards  # noqa: E402

from scalelm.checkpoint import store  # noqa: E402
from scalelm.checkpoint.resume import find_checkpoint, load_checkpoint  # noqa: E402
from scalelm.checkpoint.run_state import RunState  # noqa: E402
from scalelm.checkpoint.save import size as checkpoint_size  # noqa: E402
from scalelm.checkpoint.saver import Checkpoints  # noqa: E402
from scalelm.config import load_config, validate  # noqa: E402
from scalelm.data.loader import loader_from_config  # noqa: E402
from scalelm.model.build import build_model  # noqa: E402
from scalelm.objectives.next_token import NextToken  # noqa: E402
from scalelm.parallel.engine import Engine  # noqa: E402
from scalelm.parallel.topology import destroy_distributed, init_distributed  # noqa: E402
from scalelm.train.optim import AdamW  # noqa: E402
from scalelm.train.schedule import Schedule  # noqa: E402
from scalelm.train.sources import Loader  # noqa: E402

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
                                        "train.micro_batch_size=1", "train.global_batch_size=1", "checkpoint.keep=1", *args.overrides])
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
    engine = Engine(cfg, layout, build_model(cfg, layout, VOCAB), NextToken(), AdamW(cfg.optim), Schedule(cfg.optim))
    loader = Loader(loader_from_config(cfg, "train", 0, 1), reads=True)
    params = sum(p.numel() for _, p in engine.named_parameters())
    print(f"model: {cfg.model.num_layers} layers x {cfg.model.hidden_size}, {params / 1e6:.1f}M parameters "
          f"(built in {time.perf_counter() - started:.1f} s); checkpoint dir on {root}")

    tensors = {f"{key}/{name}": engine.gather(p, key).clone() for name, p in engine.named_parameters() for key in engine.state_keys}
    size = torch_size = cold = 0

    identity = {"tokenizer_sha256": None, "base": None, "reference": None}
    blocking = Checkpoints(replace(cfg, checkpoint=replace(cfg.checkpoint, background=False)), layout, engine, identity,
                           lambda step, note: None, None)
    background = Checkpoints(cfg, layout, engine, identity, lambda step, note: None, None)

    def ours(i: int) -> tuple:
        nonlocal size, cold
        started = time.perf_counter()
        blocking.save(2 * i + 1, RunState(step=2 * i + 1), loader.state_dict(), "bench")
        saved = time.perf_counter() - started
        size = checkpoint_size(store.read_manifest(store.resolve(root / "run" / "checkpoints")))
        cold = drop_page_cache()
        started = time.perf_counter()
        ckpt, manifest, _ = find_checkpoint(cfg, layout)  # verifies every file's SHA-256
        load_checkpoint(cfg, layout, engine, loader, ckpt, manifest, None)
        return saved, time.perf_counter() - started

    def behind(i: int) -> tuple:
        """(training blocked, the write after it, the commit after that) of a save in the background."""
        started = time.perf_counter()
        background.save(2 * i + 2, RunState(step=2 * i + 2), loader.state_dict(), "bench")
        snapshot = time.perf_counter()
        joined([background.flight.future])
        written = time.perf_counter()
        background.wait()
        return snapshot - started, written - snapshot, time.perf_counter() - written

    def plain(i: int) -> tuple:
        nonlocal torch_size
        path = root / "plain.pt"
        started = time.perf_counter()
        fsynced(path, lambda f: torch.save(tensors, f))
        saved = time.perf_counter() - started
        drop_page_cache()
        started = time.perf_counter()
        torch.load(path, weights_only=True)
        torch_size = path.stat().st_size
        path.unlink()  # its pages leave the cache, as a checkpoint's do (see above)
        return saved, time.perf_counter() - started

    def raw(i: int) -> tuple:
        """The same tensors' bytes, written one after the other: the disk's ceiling for them."""
        started = time.perf_counter()
        fsynced(root / "raw.bin", lambda f: [f.write(t.reshape(-1).view(torch.uint8).numpy()) for t in tensors.values()])
        seconds = time.perf_counter() - started
        (root / "raw.bin").unlink()  # as torch.save's
        return seconds, None

    writers = {"scalelm": ours, "background": behind, "torch": plain, "raw": raw}
    times: dict[str, list] = {name: [] for name in writers}
    # NOTE: round 0 warms up and is not counted. The writers take turns in a rotating order: this
    # VM's disk writes in bursts, and whoever writes right after another writer pays for its flush.
    for i in range(repeats + 1):
        names = list(writers)[i % len(writers):] + list(writers)[: i % len(writers)]
        for name in names:
            result = writers[name](i)
            if i:
                times[name].append(result)

    def row(name: str, nbytes: int, seconds: list[float]) -> str:
        s = statistics.median(seconds)
        return f"  {name:<34} {nbytes / 1e9:6.2f} GB  {s:6.2f} s  {nbytes / s / 1e9:6.2f} GB/s"

    median = {name: [statistics.median(t[k] for t in times[name]) if times[name][0][k] is not None else None
                     for k in range(len(times[name][0]))] for name in times}
    blocked, written, committed = median["background"]
    print(f"save (fsync'd), median of {repeats}:")
    print(row("scalelm, blocking: training waits", size, [median["scalelm"][0]]))
    print(f"  {'scalelm, background: training waits':<34} {size / 1e9:6.2f} GB  {blocked:6.2f} s  "
          f"{blocked / median['scalelm'][0]:6.1%} of the blocking save's wait")
    print(row("scalelm, background: the write", size, [written])
          + f"  {median['raw'][0] / written:.2f}x the raw write; then the commit {committed:.2f} s")
    print(row("torch.save of the same tensors", torch_size, [median["torch"][0]]))
    print(row("raw write of the same bytes", torch_size, [median["raw"][0]]))
    print(f"load ({'cold: page cache dropped' if cold else 'warm: page cache not dropped (needs root)'}):")
    print(row("scalelm resume (verify + load)", size, [t[1] for t in times["scalelm"]]))
    print(row("torch.load(weights_only=True)", torch_size, [t[1] for t in times["torch"]]))


if __name__ == "__main__":
    main()
