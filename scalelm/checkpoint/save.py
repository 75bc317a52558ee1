"""Saving a checkpoint: every rank takes part, each whole tensor is written once, `latest` moves last.

    1. rank 0 makes STEP.tmp                                          (store.start)
    2. every rank lists its parameters; all agree who writes which:  each name goes to the rank
       holding it that has been given the fewest bytes so far. A LoRA run lists its adapters alone:
       its frozen weights are its base's, which the manifest names (checkpoint/base.py)
    3. each parameter's weight and moments are gathered whole        (Engine.gather, collective)
       and kept only by their writer, which streams them into its files (one tensor in memory at a time)
    4. every rank writes its RNG states; rank 0 gathers every file's size and SHA-256, the loader
       states and the counters, and commits: manifest, rename, `latest`  (store.commit)
    5. every rank learns that the commit happened before it goes on; a rank that could not write
       (disk full, no permission) makes every rank raise the same CheckpointError instead

A rank killed at any point before 4 finishes leaves only STEP.tmp behind.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from scalelm.checkpoint import rng, store
from scalelm.checkpoint.base import base_of
from scalelm.config import Config, to_dict
from scalelm.errors import CheckpointError, ScalelmError
from scalelm.parallel import state
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import Layout, gather_objects


def save_checkpoint(cfg: Config, layout: Layout, engine: Engine, step: int, run: dict, loader_state: dict | None,
                    tokenizer_sha256: str | None, base: dict | None = None, reference: dict | None = None) -> dict:
    """Save the state after `step` into checkpoint.dir; collective. Returns {path, bytes, seconds} on every rank.
    A LoRA run's `base` is the record (checkpoint/base.py) of the weights it loaded, by default train.init_from's.
    A DPO run's `reference` is the record of the scored log-probs it trains with (train/score.py).
    If any rank cannot write (disk full, no permission), every rank raises CheckpointError together
    and the previous checkpoint stays the newest."""
    started = time.perf_counter()
    root = Path(cfg.checkpoint.dir)
    tmp = store.temp_dir(root, step)
    _agree(_attempt(store.start, root, step) if layout.rank == 0 else None, step)

    # A LoRA run's frozen weights are its base's, which the manifest names; any other frozen weight is saved
    # with its weight alone (state.states).
    lora_base = (base or base_of(Path(cfg.train.init_from))) if cfg.finetune.lora is not None else None
    params = [(name, p) for name, p in engine.named_parameters() if p.requires_grad or lora_base is None]
    writers = _assign_writers([(name, getattr(p, "ds_numel", p.numel())) for name, p in params], layout.world)
    mine = {name: (engine.whole_shape(p), state.states(p)) for name, p in params if writers[name] == layout.rank}
    model, optimizer = f"model-{layout.rank:05d}.safetensors", f"optimizer-{layout.rank:05d}.safetensors"
    with_moments = any(len(states) > 1 for _, states in mine.values())
    out: dict[str, store.TensorWriter] = {}
    failed = None  # a rank that cannot write still takes part in every gather; then all give up together
    with contextlib.ExitStack() as stack:
        if mine:  # streamed: gathered and written one tensor at a time
            failed = _attempt(_open_writers, stack, out, tmp / model, tmp / optimizer, mine)
        for name, param in params:
            for key in state.states(param):
                whole = engine.gather(param, key)  # collective over the stage's data and tensor groups
                if name in mine and failed is None:
                    failed = _attempt(out[key].write, name if key == "param" else f"{key}/{name}", whole.detach().cpu())
    files = {}
    if mine and failed is None:
        files = {model: out["param"].record} | ({optimizer: out["exp_avg"].record} if with_moments else {})
    tensors = {name: {"model": model, "shape": list(shape), "states": list(states)}
               | ({"optimizer": optimizer} if len(states) > 1 else {}) for name, (shape, states) in mine.items()}
    rng_file = f"rng-{layout.rank:05d}.safetensors"
    if failed is None:
        record = _attempt(store.write_tensors, tmp / rng_file, *rng.capture())
        if isinstance(record, str):
            failed = record
        else:
            files[rng_file] = record

    first_of_dp = layout.tp_rank == 0 and layout.pp_rank == 0  # the first stage draws every micro-batch
    report = {"files": files, "tensors": tensors, "dp_rank": layout.dp_rank, "failed": failed,
              "loader": loader_state if first_of_dp else None}
    reports = gather_objects(report)
    _raise_if(next((f"rank {rank}: {r['failed']}" for rank, r in enumerate(reports) if r["failed"]), None), step)
    total = sum(f["bytes"] for r in reports for f in r["files"].values())
    committed = None
    if layout.rank == 0:
        loaders = {r["dp_rank"]: r["loader"] for r in reports if r["loader"] is not None}
        manifest = {
            "step": step, "run": run, "created": time.time(),
            "config": to_dict(cfg), "tokenizer_sha256": tokenizer_sha256, "base": lora_base, "reference": reference,
            "layout": {"tensor": layout.tensor, "pipeline": layout.pipeline, "data": layout.data,
                       "world": layout.world, "zero_stage": cfg.parallel.zero_stage},
            "counters": engine.counters(),
            "loader": [loaders.get(d) for d in range(layout.data)],
            "tensors": {name: entry for r in reports for name, entry in r["tensors"].items()},
            "files": {name: entry for r in reports for name, entry in r["files"].items()},
        }
        committed = _attempt(_commit, root, step, manifest, cfg.checkpoint.keep)
    _agree(committed, step)  # also the barrier: no rank goes on before the checkpoint is committed
    return {"path": str(store.step_dir(root, step)), "bytes": total, "seconds": time.perf_counter() - started}


def _open_writers(stack: contextlib.ExitStack, out: dict, model: Path, optimizer: Path, mine: dict) -> None:
    """The rank's model file, and its optimizer file when any of its tensors has moments."""
    out["param"] = stack.enter_context(store.TensorWriter(model, {n: (s, torch.float32) for n, (s, _) in mine.items()}))
    moments = {f"{key}/{n}": (s, torch.float32) for n, (s, states) in mine.items() for key in states[1:]}
    if moments:
        out["exp_avg"] = out["exp_avg_sq"] = stack.enter_context(store.TensorWriter(optimizer, moments))


def _commit(root: Path, step: int, manifest: dict, keep: int) -> None:
    store.commit(root, step, manifest)
    store.prune(root, keep)


def _attempt(fn, *args):
    """fn(*args), or the one-line reason (a str) it could not write."""
    try:
        return fn(*args)
    except OSError as e:
        return f"{e.strerror or e} ({e.filename})" if e.filename else str(e)
    except ScalelmError as e:
        return str(e)


def _agree(failure: str | None, step: int) -> None:
    """Every rank learns whether any failed (collective); all raise the same error if one did."""
    _raise_if(next((f for f in gather_objects(failure) if isinstance(f, str)), None), step)


def _raise_if(failure: str | None, step: int) -> None:
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
