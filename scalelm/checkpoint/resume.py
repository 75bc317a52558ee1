"""Resuming: the newest checkpoint that verifies, checked against this run, loaded into any layout.

`train.resume=auto` takes the newest committed checkpoint in checkpoint.dir whose files all match
their manifest (every rank hashes its share of the files); a damaged one is reported and the one
before it is tried. A checkpoint whose model or tokenizer differ from this run's is refused, since
loading it would silently change the math. The weights and AdamW's moments load into any layout
(they are stored whole); RNG streams and the loader position continue exactly when the layout is
the one that saved them, and otherwise restart as the notes say.

A LoRA checkpoint holds what it trains alone, the adapters (and a classification head): its frozen weights load
from its base (checkpoint/base.py),
which must be train.init_from's (the same SHA-256), and its adapters must be the config's (finetune.lora).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from scalelm.checkpoint import base as base_checkpoint
from scalelm.checkpoint import rng, store
from scalelm.checkpoint.run_state import RunState
from scalelm.config import Config, model_differences, to_dict
from scalelm.errors import CheckpointError, DataError
from scalelm.model import lora
from scalelm.model.gpt import SCORE
from scalelm.model.spec import local_name
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import Layout, gather_objects


def find_checkpoint(cfg: Config, layout: Layout) -> tuple[Path | None, dict | None, list[str]]:
    """(checkpoint, its manifest, notes for the log), or (None, None, notes) to start from scratch; collective."""
    root = Path(cfg.checkpoint.dir)
    if cfg.train.resume == "none":
        earlier = store.committed(root)
        if earlier:  # saving beside them would mix two runs' checkpoints, and a later resume would pick one
            raise CheckpointError(f"checkpoint.dir={root} holds checkpoints of an earlier run (newest {earlier[0].name}) "
                                  f"and train.resume=none: set checkpoint.dir elsewhere, move them away, or resume")
        return None, None, []
    auto = cfg.train.resume == "auto"
    # rank 0's listing for everyone: ranks that listed for themselves could disagree and hang in _verify
    candidates = [Path(p) for p in gather_objects(
        [str(p) for p in (store.committed(root) if auto else [store.resolve(Path(cfg.train.resume))])])[0]]
    notes, rejected = [], []
    for ckpt in candidates:
        manifest, problems = _verify(ckpt, layout)
        if not problems:
            notes += _set_aside_newer(root, manifest["step"], layout)
            return ckpt, manifest, notes
        problem = problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
        if not auto:
            raise CheckpointError(f"checkpoint {ckpt} failed verification: {problem}")
        rejected.append(f"{ckpt.name}: {problem}")
        notes.append(f"checkpoint {ckpt} failed verification ({problem}); trying the one before it")
    if rejected:
        raise CheckpointError(f"no checkpoint in {root} verifies ({'; '.join(rejected)}): "
                              f"move them away, or set checkpoint.dir elsewhere to start over")
    return None, None, notes


def load_checkpoint(cfg: Config, layout: Layout, engine: Engine, source, ckpt: Path, manifest: dict,
                    tokenizer_sha256: str | None) -> tuple[RunState, list[str]]:
    """Load `ckpt` into this run and its batch source (train/sources.py); returns the saved run state and notes
    for the log. Collective."""
    if manifest.get("weights_only"):
        raise CheckpointError(f"{ckpt} holds weights alone (no optimizer or data state): start a run from it with "
                              f"train.init_from={ckpt} instead of train.resume")
    _check_fits(cfg, ckpt, manifest, tokenizer_sha256)
    notes = [f"resuming from {ckpt} (step {manifest['step']})"]
    changed = _changed_settings(manifest["config"], to_dict(cfg))
    if changed:
        notes.append("settings changed since the checkpoint: " + ", ".join(changed))
    _load_weights(cfg, engine, ckpt, manifest, engine.state_keys, Path(cfg.train.init_from) if cfg.train.init_from
                  else None, "train.init_from")
    engine.load_counters(manifest["counters"])

    saved = manifest["layout"]
    same_grid = (saved["tensor"], saved["pipeline"], saved["data"]) == (layout.tensor, layout.pipeline, layout.data)
    if same_grid:
        rng.restore(*store.read_rank_tensors(ckpt / f"rng-{layout.rank:05d}.safetensors"))
    else:
        rng.reseed(cfg.train.seed + manifest["step"])
        notes.append(f"layout changed (tensor x pipeline x data {saved['tensor']}x{saved['pipeline']}x{saved['data']} -> "
                     f"{layout.tensor}x{layout.pipeline}x{layout.data}): weights and optimizer state resharded, "
                     f"dropout streams reseeded")
    notes += _resume_source(source, manifest["loader"], layout)
    dist.barrier()
    return RunState.from_dict(manifest["run"]), notes


def init_weights(cfg: Config, engine: Engine, tokenizer_sha256: str | None, base: Path | None = None,
                 flag: str = "--base PATH") -> str:
    """Load the weights of `train.init_from` (any checkpoint of this model) into a fresh run; a note for the log.
    The optimizer, schedule, data order and RNG start anew. A LoRA checkpoint's base is found at `base`, or
    where the checkpoint names it (`flag` says how to give it). Collective."""
    ckpt = store.resolve(Path(cfg.train.init_from))
    manifest = store.read_manifest(ckpt)
    _check_weights(ckpt, manifest, "train.init_from=")
    _check_fits(cfg, ckpt, manifest, tokenizer_sha256)
    _load_weights(cfg, engine, ckpt, manifest, ("param",), base, flag)
    dist.barrier()
    fresh = " (adapters freshly initialised: finetune.lora)" if cfg.finetune.lora and not manifest.get("base") else ""
    return f"started from the weights of {ckpt}" + (f" ({manifest['source']})" if manifest.get("source") else "") + fresh


def _check_weights(ckpt: Path, manifest: dict, what: str = "") -> None:
    problems = store.verify(ckpt, manifest, sorted(f for f in manifest["files"] if not f.startswith(("optimizer", "rng"))))
    if problems:
        raise CheckpointError(f"{what}{ckpt} failed verification: {problems[0]}")


def _load_weights(cfg: Config, engine: Engine, ckpt: Path, manifest: dict, keys: tuple[str, ...], base: Path | None,
                  flag: str) -> None:
    """The checkpoint's `keys` states into the engine. A LoRA checkpoint's frozen weights come from its base
    (found at `base`, else where the checkpoint says); a LoRA run started from a plain checkpoint keeps its
    freshly initialised adapters. Collective."""
    params = engine.named_parameters()
    # whether each model ends in a classification head: the checkpoint's tensors say, and this run's objective
    # (every pipeline stage must agree, and only the last holds the head)
    scores_there, scores_here = SCORE in manifest["tensors"], engine.objective.num_labels() is not None
    if scores_there != scores_here:  # a classification head on a language model: the head starts anew
        if scores_there:
            raise CheckpointError(f"{ckpt} is a classification model (finetune.head=classification): it has no language "
                                  f"model head to start from; start from the model it was finetuned from")
        if keys != ("param",):
            saved = manifest["config"].get("finetune", {}).get("head", "lm")
            raise CheckpointError(f"{ckpt} was saved with finetune.head={saved}, and this run has "
                                  f"{cfg.finetune.head}: resume with the head it was saved with")
        params = [(n, p) for n, p in params if not n.startswith("head.")]
    adapters = [(n, p) for n, p in params if lora.is_adapter(n)]
    saved_lora = manifest["config"].get("finetune", {}).get("lora")
    ours = to_dict(cfg)["finetune"]["lora"]
    if manifest.get("base"):
        same = ("rank", "targets", "alpha", "rslora")  # what the adapters compute; their dropout may change
        if not adapters or {k: saved_lora[k] for k in same} != {k: ours[k] for k in same}:
            raise CheckpointError(f"{ckpt} holds LoRA adapters ({', '.join(f'{k}={saved_lora[k]}' for k in same)}), and "
                                  f"this run's finetune.lora is {ours}: set finetune.lora as it was trained, or export "
                                  f"the merged model (scalelm convert to-hf) to start from")
        base_ckpt, base_manifest = base_checkpoint.locate(manifest["base"], base, str(ckpt), flag)
        _check_weights(base_ckpt, base_manifest, "the base ")
        _load_tensors(engine, base_ckpt, base_manifest, [(n, p) for n, p in params if not lora.is_trained(n)], ("param",))
        params = [(n, p) for n, p in params if lora.is_trained(n)]  # the adapters, and a classification head
    elif keys != ("param",) and (saved_lora is None) != (ours is None):
        raise CheckpointError(f"{ckpt} was saved {'without' if saved_lora is None else 'with'} LoRA adapters and this "
                              f"run has finetune.lora={ours}: resume with the setting it was saved with, or set "
                              f"checkpoint.dir elsewhere to start over")
    else:
        params = [(n, p) for n, p in params if not lora.is_adapter(n)]  # the start of a LoRA run: a plain checkpoint
    _load_tensors(engine, ckpt, manifest, params, keys)


def _load_tensors(engine: Engine, ckpt: Path, manifest: dict, params: list, keys: tuple[str, ...]) -> None:
    """Each of `params`' `keys` states that it and the checkpoint both have, from the checkpoint's whole
    tensors into this rank's slices. A norm Transformer Engine's spec saved inside its linear loads into the
    local spec's norm (a LoRA run, which uses that spec, from a base trained with Transformer Engine)."""
    reader = store.TensorReader(ckpt, manifest)
    local = {local_name(saved): saved for saved in manifest["tensors"]}
    for name, param in params:
        name_there = name if name in manifest["tensors"] else local.get(name, name)
        entry = manifest["tensors"].get(name_there)
        if entry is None:
            raise CheckpointError(f"{ckpt}: no tensor {name}: the checkpoint holds another model")
        if tuple(entry["shape"]) != engine.whole_shape(param):
            raise CheckpointError(f"{ckpt}: tensor {name} has shape {entry['shape']}, this model's is "
                                  f"{list(engine.whole_shape(param))}")
        for key in keys:
            if key not in entry.get("states", engine.state_keys) or key not in engine.states(param):
                continue  # a frozen weight has no moments
            try:
                engine.scatter(param, key, reader.get(key, name_there))
            except ValueError as e:
                raise CheckpointError(f"{ckpt}: tensor {name} cannot be loaded here ({e})") from None


def _set_aside_newer(root: Path, step: int, layout: Layout) -> list[str]:
    """Rename checkpoints newer than the one resumed from (damaged, or rolled back past) to STEP.superseded-N,
    so that neither retention nor a later auto-resume mistakes them for this run's; collective."""
    notes = []
    if layout.rank == 0:
        for newer in store.committed(root):
            if int(newer.name.removeprefix("step-")) > step:
                aside = newer.with_name(f"{newer.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
                newer.rename(aside)
                notes.append(f"{newer} is newer than the checkpoint resumed from: set aside as {aside.name}")
    dist.barrier()
    return notes


def _verify(ckpt: Path, layout: Layout) -> tuple[dict | None, list[str]]:
    """The manifest and every problem any rank found with the files (each rank hashes every world-th file)."""
    try:
        manifest = store.read_manifest(ckpt)
        files = sorted(manifest["files"])
        problems = store.verify(ckpt, manifest, files[layout.rank::layout.world])
    except CheckpointError as e:
        manifest, problems = None, [str(e)]
    everyone = gather_objects(problems)
    return manifest, sorted({p for found in everyone for p in found})


def _check_fits(cfg: Config, ckpt: Path, manifest: dict, tokenizer_sha256: str | None) -> None:
    differ = model_differences(to_dict(cfg)["model"], manifest["config"]["model"])
    if differ:
        raise CheckpointError(f"checkpoint {ckpt} holds another model ({'; '.join(differ)}): use its model "
                              f"settings, or set checkpoint.dir elsewhere to start over")
    if tokenizer_sha256 and manifest["tokenizer_sha256"] and tokenizer_sha256 != manifest["tokenizer_sha256"]:
        raise CheckpointError(f"checkpoint {ckpt} was trained with another tokenizer than data.tokenizer="
                              f"{cfg.data.tokenizer}: use that tokenizer and shards made with it")


def _changed_settings(saved: dict, ours: dict) -> list[str]:
    """The settings that differ from the checkpoint's; a setting it lacks (saved by a scalelm older than the setting)
    had its default there."""
    changed, defaults = [], to_dict(Config())
    for section in ("parallel", "optim", "data", "train", "finetune"):
        theirs = {**defaults[section], **saved.get(section, {})}
        for key, value in ours[section].items():
            if theirs.get(key) != value and key != "resume":
                changed.append(f"{section}.{key} {theirs.get(key)!r} -> {value!r}")
    return changed


def _resume_source(source, states: list[dict | None], layout: Layout) -> list[str]:
    """The batch source exactly where it was when its layout is unchanged; otherwise as `continue_from` says."""
    state = states[layout.dp_rank] if len(states) == layout.data else None
    if state is not None:
        try:
            source.load_state_dict(state)
            return []
        except DataError:
            pass  # another batch shape, data-parallel size or worker count
    return [source.continue_from(states)]
