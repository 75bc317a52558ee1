"""Reference log-probs for DPO of a fully finetuned policy: train.init_from scores every pair once, and they are
stored beside the shards (data/reference.py), so no second model is held in memory while training.

`scalelm score --config CFG` does it on its own; a DPO run without LoRA does it as its first stage when they are
missing. Every shard of data.train and data.val, both splits, is read in stored order, one at a time; its windows
are dealt round-robin to the data-parallel ranks, each runs them forward only, in the run's layout and precision,
and each side's Σ log p over its targets is kept. Rank 0 writes them. A data-parallel rank short of windows at a
shard's end runs a copy with no targets, so every rank runs as many forward passes.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scalelm import objectives
from scalelm.checkpoint import store
from scalelm.checkpoint.resume import init_weights
from scalelm.config import Config
from scalelm.data.chat_shards import check_fits
from scalelm.data.files import sha256_file
from scalelm.data.packing import ChatWindows
from scalelm.data.reference import has_reference, manifest_sha256, write_reference
from scalelm.data.shards import SPLITS, read_manifest, read_shard_fields
from scalelm.data.tokenizer import resolve_vocab_size
from scalelm.errors import DataError
from scalelm.model.build import build_model
from scalelm.objectives import Objective, Output
from scalelm.objectives.documents import document_logps
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import before_the_ranks_meet, gather_objects, process_group


def reference_model(cfg: Config) -> dict:
    """{"path", "sha256"} of the model that scores: train.init_from's checkpoint, named by its manifest's hash."""
    ckpt = store.resolve(Path(cfg.train.init_from)).resolve()
    return {"path": str(ckpt), "sha256": sha256_file(ckpt / store.MANIFEST)}


def reference_sources(cfg: Config) -> list[str]:
    return list(dict.fromkeys([*cfg.data.train, *cfg.data.val]))


def missing(cfg: Config, model: dict) -> list[str]:
    return [s for s in reference_sources(cfg) if not has_reference(s, model["sha256"])]


def score(cfg: Config, objective: Objective, layout, model: dict, sources: list[str], log=print) -> None:
    """Score `sources` with `model` (train.init_from) on this rank's layout; rank 0 writes. Collective."""
    tokenizer_sha = sha256_file(cfg.data.tokenizer) if cfg.data.tokenizer else None
    # the objective's fields (labels, loss_mask, document_ids) are what the last pipeline stage is handed
    engine = Engine(cfg, layout, build_model(cfg, layout, cfg.model.vocab_size, documents=True), objective)
    init_weights(cfg, engine, tokenizer_sha)
    for source in sources:
        started, values = time.perf_counter(), {}
        for split in SPLITS:
            values[split] = _score_split(cfg, layout, engine, read_manifest(source, split, tokenizer_sha))
        if layout.rank == 0:
            where = write_reference(source, model, {"precision": cfg.train.precision, "layout": {
                "tensor": layout.tensor, "pipeline": layout.pipeline, "data": layout.data}}, values)
            documents = sum(len(v) for split in values.values() for v in split.values())
            log(f"scored {documents // 2:,} pairs of {source} with {model['path']} in {time.perf_counter() - started:.1f} s "
                f"-> {where}")
        torch.distributed.barrier()
    del engine  # before the run builds its own
    gc.collect()


def _score_split(cfg: Config, layout, engine, shards) -> dict[str, np.ndarray]:
    """{shard name: (documents,) float64} of one split, shard by shard (one in memory at a time). Collective."""
    if not shards.pairs:
        raise DataError(f"{shards.source} holds no preference pairs: score shards written by `scalelm shard --preference`")
    check_fits([shards], cfg.train.seq_len, "assistant")
    quiet = layout.rank != 0 or not sys.stderr.isatty()
    with tqdm(total=len(shards.shards), desc=f"score {shards.split}", unit=" shard", disable=quiet) as bar:
        out = {}
        for shard in shards.shards:
            out[shard.name] = _score_shard(cfg, layout, engine, shards, shard)
            bar.update(1)
    return out


def _score_shard(cfg: Config, layout, engine, shards, shard) -> np.ndarray:
    """(documents,) float64: each side's Σ log p over its targets, on every rank. Its windows are dealt round-robin
    to the data-parallel ranks, each padded with copies without targets to as many micro-batches. Collective."""
    seq_len, batch = cfg.train.seq_len, cfg.train.micro_batch_size
    fields = read_shard_fields(shard, {"tokens": shards.dtype, "flags": np.dtype(np.uint8)})
    packed = ChatWindows(fields["tokens"], fields["flags"], shard.lengths, seq_len, "assistant", pairs=True)
    if not len(packed):  # an empty shard (a split without pairs)
        return np.empty(0, np.float64)
    mine = list(range(layout.dp_rank, len(packed), layout.data))
    per_rank = -(-len(packed) // layout.data)
    rows = [packed[i] for i in mine]
    blank = {**packed[0], "loss_mask": np.zeros(seq_len, bool)}  # no targets: its values are discarded
    rows += [blank] * (per_rank - len(rows) + (-per_rank % batch))
    micro = [{k: torch.from_numpy(np.stack([r[k] for r in rows[i:i + batch]])) for k in rows[0]}
             for i in range(0, len(rows), batch)]
    found = engine.forward_only(micro, len(micro), Output.LOGPROBS)
    scored = {}  # document -> value, from this rank's windows
    if found and found[0] is not None:  # the ranks that compute the loss (on the pipeline, its last stage)
        sums = [document_logps(logps, b).double().cpu() for logps, b in zip(found, micro)]
        for k, i in enumerate(mine):
            value, first = sums[k // batch][k % batch], packed.starts[i]
            scored.update({int(d): float(value[d - first]) for d in range(first, packed.starts[i + 1])})
    every = {d: v for part in gather_objects(scored) for d, v in part.items()}
    return np.asarray([every[d] for d in range(len(shard.lengths))], np.float64)


def run_reference(cfg: Config, objective: Objective, layout, saved: dict | None) -> tuple[dict | None, list[str]]:
    """The reference record of a run whose objective needs a reference (DPO) and that has no LoRA adapters to switch
    off for one, {"model": {"path", "sha256"}, "manifests": {source: SHA-256 of its reference manifest}}, after
    scoring what is missing; None for any other run. `saved` is the record of the checkpoint resumed from, whose
    files must be unchanged. Also notes for the log. Collective."""
    if not objective.reference or cfg.finetune.lora is not None:
        return None, []
    if saved is not None:
        for source, sha in saved["manifests"].items():
            if not has_reference(source, saved["model"]["sha256"]) or manifest_sha256(source, saved["model"]["sha256"]) != sha:
                raise DataError(f"the reference log-probs of {source} by {saved['model']['path']} are not those this run "
                                f"trained with (they were scored again, or removed): resume with the same ones, or start "
                                f"a new run (checkpoint.dir)")
        return saved, []
    model, notes = reference_model(cfg), []
    todo = missing(cfg, model)
    if todo:
        notes.append(f"scoring the reference log-probs of {', '.join(todo)} with train.init_from first")
        score(cfg, objective, layout, model, todo, log=notes.append)
    return {"model": model, "manifests": {s: manifest_sha256(s, model["sha256"]) for s in reference_sources(cfg)}}, notes


def score_command(cfg: Config, overwrite: bool) -> None:
    """`scalelm score`: the reference log-probs of the config's preference shards by train.init_from, on this
    launch's ranks; with `overwrite`, those already there are scored again. Collective."""
    with before_the_ranks_meet():
        objective = objectives.objective_for(cfg, "finetune")
        if not objective.reference:
            raise DataError(f"scalelm score computes the reference log-probs an objective like DPO compares with, and "
                            f"finetune.objective={objective.name} needs none: set finetune.objective=dpo")
        if cfg.finetune.lora is not None:
            raise DataError("finetune.lora is set: a LoRA policy's reference is its base with the adapters off, "
                            "computed during training, so there is nothing to score")
        cfg.model.vocab_size = resolve_vocab_size(cfg)
        model = reference_model(cfg)
        todo = reference_sources(cfg) if overwrite else missing(cfg, model)
    with process_group(cfg.parallel, cfg.train.seed) as layout:
        if not todo and layout.rank == 0:
            print(f"nothing to score: every source has reference log-probs by {model['path']} (--overwrite scores again)")
        if todo:
            score(cfg, objective, layout, model, todo, log=print if layout.rank == 0 else (lambda _: None))
