"""Saving a checkpoint: every rank takes part, each whole tensor is written once, `latest` moves last.

    1. rank 0 makes STEP.tmp                                          (begin: store.start)
    2. every rank lists its parameters; all agree who writes which:  each name goes to the rank
       holding it that has been given the fewest bytes so far. A LoRA run lists its adapters alone:
       its frozen weights are its base's, which the manifest names (checkpoint/base.py)
    3. each parameter's weight and moments are gathered whole        (gathered: Engine.gather, collective)
       and kept only by their writer, which writes them into its files (write), with its RNG states
    4. rank 0 gathers every file's size and SHA-256, the loader states and the counters, and
       commits: manifest, rename, `latest`                            (collect, then store.commit)
    5. every rank learns that the commit happened before it goes on; a rank that could not write
       (disk full, no permission) makes every rank raise the same CheckpointError instead

`save_checkpoint` does it all at once, streaming each tensor into its file as it is gathered (one tensor
in memory at a time). checkpoint/saver.py does 1-3 while training waits, with host copies of the tensors,
and the rest in the background. A rank killed at any point before 4 finishes leaves only STEP.tmp behind.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from scalelm import compat
from scalelm.checkpoint import rng, store
from scalelm.checkpoint.base import base_of
from scalelm.checkpoint.run_state import RunState
from scalelm.config import Config, to_dict
from scalelm.errors import CheckpointError, ScalelmError
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import Layout, gather_objects


@dataclass
class Save:
    """One checkpoint in the making, as this rank sees it."""

    step: int
    root: Path
    keep: int
    params: list[tuple[str, torch.nn.Parameter]]  # every parameter of this rank that the checkpoint holds
    mine: dict[str, tuple[tuple[int, ...], tuple[str, ...]]]  # name -> (whole shape, states) of those this rank writes
    header: dict  # the manifest but for its tensors and files (rank 0 writes it)
    report: dict  # what rank 0 needs from this rank: its files and tensors, its loader state, whether it failed

    @property
    def tmp(self) -> Path:
        return store.temp_dir(self.root, self.step)

    @property
    def bytes(self) -> int:
        """The bytes of this rank's tensors (fp32 whole)."""
        return sum(4 * len(states) * math.prod(shape) for shape, states in self.mine.values())


def save_checkpoint(cfg: Config, layout: Layout, engine: Engine, step: int, run: RunState, loader_state: dict | None,
                    tokenizer_sha256: str | None, base: dict | None = None, reference: dict | None = None) -> dict:
    """Save the state after `step` into checkpoint.dir; collective. Returns {path, bytes, seconds} on every rank.
    A LoRA run's `base` is the record (checkpoint/base.py) of the weights it loaded, by default train.init_from's.
    A DPO run's `reference` is the record of the scored log-probs it trains with (train/score.py).
    If any rank cannot write (disk full, no permission), every rank raises CheckpointError together
    and the previous checkpoint stays the newest."""
    started = time.perf_counter()
    save = begin(cfg, layout, engine, step, run, loader_state, tokenizer_sha256, base, reference)
    write(save, gathered(save, engine), rng.capture())  # streamed: gathered and written one tensor at a time
    manifest = collect(save, layout)
    agree(attempt(commit, save, manifest) if layout.rank == 0 else None, step)  # also the barrier
    return {"path": str(store.step_dir(save.root, step)), "bytes": size(manifest), "seconds": time.perf_counter() - started}


def begin(cfg: Config, layout: Layout, engine: Engine, step: int, run: RunState, loader_state: dict | None,
          tokenizer_sha256: str | None, base: dict | None = None, reference: dict | None = None) -> Save:
    """STEP.tmp made, the writers agreed and the state beside the tensors taken; collective."""
    root = Path(cfg.checkpoint.dir)
    agree(attempt(store.start, root, step) if layout.rank == 0 else None, step)
    # A LoRA run's frozen weights are its base's, which the manifest names; any other frozen weight is saved
    # with its weight alone (engine.states).
    lora_base = (base or base_of(Path(cfg.train.init_from))) if cfg.finetune.lora is not None else None
    params = [(name, p) for name, p in engine.named_parameters() if p.requires_grad or lora_base is None]
    writers = _assign_writers([(name, compat.whole_numel(p)) for name, p in params], layout.world)
    mine = {name: (engine.whole_shape(p), engine.states(p)) for name, p in params if writers[name] == layout.rank}
    model, optimizer = _files(layout.rank)[:2]
    tensors = {name: {"model": model, "shape": list(shape), "states": list(states)}
               | ({"optimizer": optimizer} if len(states) > 1 else {}) for name, (shape, states) in mine.items()}
    first_of_dp = layout.tp_rank == 0 and layout.pp_rank == 0  # the first stage draws every micro-batch
    header = {"step": step, "run": run.as_dict(), "config": to_dict(cfg), "objective": engine.objective.name,
              "tokenizer_sha256": tokenizer_sha256, "base": lora_base, "reference": reference,
              "layout": {"tensor": layout.tensor, "pipeline": layout.pipeline, "data": layout.data, "world": layout.world,
                         "zero_stage": cfg.parallel.zero_stage},
              "counters": engine.counters().as_dict()}
    report = {"rank": layout.rank, "files": {}, "tensors": tensors, "dp_rank": layout.dp_rank, "failed": None,
              "loader": loader_state if first_of_dp else None}
    return Save(step, root, cfg.checkpoint.keep, params, mine, header, report)


def gathered(save: Save, engine: Engine, into: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """(key in its file, whole fp32 tensor) of each tensor this rank writes, in file order, each gathered into
    `into(key, shape)` when given; collective: every rank gathers every tensor of its stage, so the iterator must
    be run to its end on every rank."""
    for name, param in save.params:
        for key in engine.states(param):
            file_key = name if key == "param" else f"{key}/{name}"
            out = into(file_key, save.mine[name][0]) if into is not None and name in save.mine else None
            whole = engine.gather(param, key, out)  # collective over the stage's data and tensor groups
            if name in save.mine:
                yield file_key, whole


def write(save: Save, tensors: Iterable[tuple[str, torch.Tensor]], rng_state: tuple[dict, dict]) -> None:
    """This rank's files from `tensors` (gathered's order) and its RNG states, into save.report. A rank that
    cannot write records why and still takes every tensor, since taking one may be a collective."""
    model, optimizer, rng_file = _files(save.report["rank"])
    failed = None
    with contextlib.ExitStack() as stack:
        out: dict[str, store.TensorWriter] = {}
        if save.mine:
            failed = attempt(_open_writers, stack, out, save.tmp / model, save.tmp / optimizer, save.mine)
        for key, whole in tensors:
            if failed is None:
                failed = attempt(out["param" if "/" not in key else "moments"].write, key, whole.detach().cpu())
    files = {}
    if save.mine and failed is None:
        files = {model: out["param"].record} | ({optimizer: out["moments"].record} if "moments" in out else {})
    if failed is None:
        record = attempt(store.write_tensors, save.tmp / rng_file, *rng_state)
        failed = record if isinstance(record, str) else None
        files |= {} if failed else {rng_file: record}
    save.report.update(files=files, failed=failed)


def collect(save: Save, layout: Layout) -> dict:
    """The manifest, from every rank's report, on every rank (rank 0 writes it). Raises on every rank the same
    CheckpointError when any rank failed to write. Collective."""
    reports = gather_objects(save.report)
    raise_if(next((f"rank {r['rank']}: {r['failed']}" for r in reports if r["failed"]), None), save.step)
    loaders = {r["dp_rank"]: r["loader"] for r in reports if r["loader"] is not None}
    return save.header | {"loader": [loaders.get(d) for d in range(layout.data)],
                          "tensors": {name: entry for r in reports for name, entry in r["tensors"].items()},
                          "files": {name: entry for r in reports for name, entry in r["files"].items()}}


def commit(save: Save, manifest: dict) -> None:
    """Rank 0's part: the manifest written, STEP.tmp renamed, `latest` moved, old checkpoints pruned."""
    store.commit(save.root, save.step, manifest | {"created": time.time()})
    store.prune(save.root, save.keep)


def size(manifest: dict) -> int:
    """The bytes of a checkpoint's files."""
    return sum(f["bytes"] for f in manifest["files"].values())


def _files(rank: int) -> tuple[str, str, str]:
    return f"model-{rank:05d}.safetensors", f"optimizer-{rank:05d}.safetensors", f"rng-{rank:05d}.safetensors"


def _open_writers(stack: contextlib.ExitStack, out: dict, model: Path, optimizer: Path, mine: dict) -> None:
    """The rank's model file, and its optimizer file when any of its tensors has moments."""
    out["param"] = stack.enter_context(store.TensorWriter(model, {n: (s, torch.float32) for n, (s, _) in mine.items()}))
    moments = {f"{key}/{n}": (s, torch.float32) for n, (s, states) in mine.items() for key in states[1:]}
    if moments:
        out["moments"] = stack.enter_context(store.TensorWriter(optimizer, moments))


def attempt(fn, *args):
    """fn(*args), or the one-line reason (a str) it could not write."""
    try:
        return fn(*args)
    except OSError as e:
        return f"{e.strerror or e} ({e.filename})" if e.filename else str(e)
    except ScalelmError as e:
        return str(e)


def agree(failure: str | None, step: int) -> None:
    """Every rank learns whether any failed (collective); all raise the same error if one did."""
    raise_if(next((f for f in gather_objects(failure) if isinstance(f, str)), None), step)


def raise_if(failure: str | None, step: int) -> None:
    """The CheckpointError of a save of `step` that failed, as `failure` says where and why."""
    if failure:
        raise CheckpointError(f"could not save the checkpoint of step {step}: {failure}; the previous "
                              f"checkpoint is still the newest")


def _assign_writers(local: list[tuple[str, int]], world: int) -> dict[str, int]:
    """name -> the rank that writes it: the least-loaded rank among those holding it, the same answer
    on every rank (it is computed from everyone's lists, in rank order)."""
    everyone = gather_objects(local)
    holders: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    for rank, names in enumerate(everyone):
        for name, numel in names:
            holders.setdefault(name, []).append(rank)
            sizes[name] = numel
    load = [0] * world
    writers = {}
    for name, ranks in holders.items():
        writer = min(ranks, key=lambda r: (load[r], r))
        writers[name] = writer
        load[writer] += sizes[name]
    return writers
