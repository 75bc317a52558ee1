"""A scalelm model on disk, read or written as files alone: no process group, CPU only.

What reads: a checkpoint of any layout (a step directory, or a checkpoint.dir whose newest is
taken), or the single file `scalelm checkpoint consolidate` writes. A LoRA checkpoint reads as its base
(checkpoint/base.py) with the adapters merged in (`read_model`), or as the two apart (`read_lora`).
What writes: a weights-only checkpoint (`scalelm convert from-hf`), which `train.init_from` starts a run from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open

from scalelm.checkpoint import base as base_checkpoint
from scalelm.checkpoint import store
from scalelm.config import Config, LoRAConfig, ModelConfig, from_dict, model_differences, to_dict
from scalelm.convert.layouts import normalise_names
from scalelm.data.files import make_dir, sha256_file
from scalelm.errors import CheckpointError, ConfigError
from scalelm.model import lora

TOKENIZER = "tokenizer.model"  # a weights-only checkpoint's own copy of its tokenizer
CONSOLIDATED = "scalelm-weights"  # the metadata "format" of the file `scalelm checkpoint consolidate` writes


@dataclass
class ScalelmModel:
    """Whole fp32 tensors under single-process names, the model config (vocab_size resolved) and the tokenizer."""

    model: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Path | None
    origin: str  # what it was read from, for reports


def read_model(path: Path, tokenizer: Path | None = None, verify: bool = True, base: Path | None = None,
               tokenizer_needed: bool = True) -> ScalelmModel:
    """The model saved at `path`; `tokenizer` overrides the SentencePiece model the checkpoint names (without
    `tokenizer_needed`, one that is not there is left out). A LoRA checkpoint's adapters are merged into its
    base's weights (`base` overrides the path it names)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a checkpoint directory or a consolidated .safetensors file")
    if path.is_file():
        return _read_consolidated(path, tokenizer)
    found = _read_checkpoint(path, tokenizer, verify, tokenizer_needed)
    if found.lora is None:
        return found.model
    model, adapters, settings = read_lora(path, base, tokenizer, verify, tokenizer_needed, found)
    model.weights = lora.merge(model.weights, adapters, settings)
    model.origin = found.model.origin + " merged into its base"
    return model


@dataclass
class _Read:
    model: ScalelmModel
    lora: dict | None  # the LoRA checkpoint's {"base", "settings"}, or None


def read_lora(path: Path, base: Path | None = None, tokenizer: Path | None = None, verify: bool = True,
              tokenizer_needed: bool = True, _found: _Read | None = None) -> tuple[ScalelmModel, dict[str, torch.Tensor], LoRAConfig]:
    """(the base model, the whole adapters, their settings) of the LoRA checkpoint at `path`, the adapters with a
    classification head trained beside them (lora.WHOLE) if it has one; `base` overrides the base's path the
    checkpoint names (its SHA-256 must match)."""
    found = _found or _read_checkpoint(Path(path), tokenizer, verify, tokenizer_needed)
    if found.lora is None:
        raise CheckpointError(f"{found.model.origin} holds no LoRA adapters (it was not trained with finetune.lora)")
    base_ckpt, _ = base_checkpoint.locate(found.lora["base"], base, found.model.origin, "--base PATH")
    base_model = _read_checkpoint(base_ckpt, tokenizer or found.model.tokenizer, verify, tokenizer_needed).model
    adapters = {k: v for k, v in found.model.weights.items() if lora.is_trained(k)}
    _check_adapters({k: v for k, v in adapters.items() if lora.is_adapter(k)}, base_model, found)
    base_model.tokenizer = found.model.tokenizer or base_model.tokenizer
    return base_model, adapters, found.lora["settings"]


def _check_adapters(adapters: dict[str, torch.Tensor], base: ScalelmModel, found: _Read) -> None:
    """Each adapter a pair (A, B) that fits the base weight it adapts; a CheckpointError naming the first that does not."""
    differ = model_differences(vars(base.model), vars(found.model.model))
    if differ:
        raise CheckpointError(f"{found.model.origin} was trained on another model than its base {base.origin} "
                              f"({differ[0]})")
    if not adapters:
        raise CheckpointError(f"{found.model.origin} names a base but holds no adapters")
    for name in adapters:
        a_name = name.removesuffix(".b") + ".a" if name.endswith(".lora.b") else name
        a, b = adapters.get(a_name), adapters.get(a_name.removesuffix(".a") + ".b")
        weight = base.weights.get(lora.adapted(name))
        if a is None or b is None or weight is None or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != weight.shape:
            raise CheckpointError(f"{found.model.origin}: the adapter {name.rsplit('.', 1)[0]} does not fit its base "
                                  f"{base.origin} (a missing half, or shapes that differ from {lora.adapted(name)})")


def _read_checkpoint(path: Path, tokenizer: Path | None, verify: bool, tokenizer_needed: bool = True) -> _Read:
    ckpt, manifest, weights = store.read_weights(path, check=verify)
    weights = normalise_names(weights)
    found = checkpoint_tokenizer(ckpt, manifest, tokenizer, tokenizer_needed)
    model = ScalelmModel(_model_config(manifest["config"]["model"], ckpt), weights, found, f"{ckpt} (step {manifest['step']})")
    settings = manifest["config"].get("finetune", {}).get("lora")
    if not manifest.get("base"):
        return _Read(model, None)
    return _Read(model, {"base": manifest["base"], "settings": from_dict({"finetune": {"lora": settings}}).finetune.lora})


def write_weights_only(out: Path, model: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Path | None,
                       source: str) -> Path:
    """A checkpoint directory holding weights alone (no optimizer, data or RNG state), with its tokenizer
    copied in and a config.yaml to start a run from it; returns that config's path."""
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: give a new directory")
    make_dir(out, "OUT_CKPT")
    record = store.write_tensors(out / "model-00000.safetensors", weights)
    files = {"model-00000.safetensors": record}
    cfg = Config(model=model)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER)
        files[TOKENIZER] = {"bytes": (out / TOKENIZER).stat().st_size, "sha256": sha256_file(out / TOKENIZER)}
        cfg.data.tokenizer = str(out / TOKENIZER)
    cfg.train.init_from, cfg.train.seq_len = str(out), model.max_position_embeddings
    store.write_manifest(out, {"weights_only": True, "source": source, "step": 0, "config": to_dict(cfg),
                               "tokenizer_sha256": files.get(TOKENIZER, {}).get("sha256"), "files": files,
                               "tensors": {name: {"model": "model-00000.safetensors", "shape": list(t.shape)}
                                           for name, t in weights.items()}})
    config = out / "config.yaml"
    config.write_text(f"# Start a run from the weights converted from {source}: add data.train and the run's settings.\n"
                      + yaml.safe_dump({"model": to_dict(cfg)["model"],
                                        "data": {"tokenizer": cfg.data.tokenizer} if tokenizer else {},
                                        "train": {"seq_len": cfg.train.seq_len, "init_from": str(out)}}, sort_keys=False))
    return config


def _read_consolidated(path: Path, tokenizer: Path | None) -> ScalelmModel:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CONSOLIDATED:
                raise CheckpointError(f"{path} is not a file `scalelm checkpoint consolidate` wrote")
            weights = normalise_names({k: f.get_tensor(k) for k in f.keys()})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read it as safetensors ({e})") from None
    named = meta.get("tokenizer")
    found = _tokenizer(tokenizer or (Path(named) if named else None), meta.get("tokenizer_sha256"), path)
    return ScalelmModel(_model_config(json.loads(meta["model"]), path), weights, found, str(path))


def _model_config(saved: dict, where: Path) -> ModelConfig:
    try:
        model = from_dict({"model": saved}).model
    except ConfigError as e:
        raise CheckpointError(f"{where}: its model config is not one this scalelm knows ({e})") from None
    if model.vocab_size is None:
        raise CheckpointError(f"{where}: its model config has no vocab_size")
    return model


def checkpoint_tokenizer(ckpt: Path, manifest: dict, tokenizer: Path | None = None, needed: bool = True) -> Path | None:
    """The SentencePiece model of a checkpoint: `tokenizer` when given, else its own copy, else the one its config
    names; checked against the SHA-256 it recorded. None when it names none (or, unless `needed`, one not there)."""
    own = ckpt / TOKENIZER if (ckpt / TOKENIZER).is_file() else None
    named = manifest["config"].get("data", {}).get("tokenizer")
    return _tokenizer(tokenizer or own or (Path(named) if named else None), manifest.get("tokenizer_sha256"), ckpt, needed)


def _tokenizer(path: Path | None, sha256: str | None, where: Path, needed: bool = True) -> Path | None:
    """The tokenizer, checked against the SHA-256 the checkpoint recorded; None when there is none to find (or,
    unless `needed`, when the one named is not there)."""
    if path is None or (not needed and not path.is_file()):
        return None
    if not path.is_file():
        raise CheckpointError(f"{where} was trained with the tokenizer {path}, which is not there: pass --tokenizer PATH")
    if sha256 and sha256_file(path) != sha256:
        raise CheckpointError(f"{path} is not the tokenizer {where} was trained with (SHA-256 differs): pass the right one "
                              f"with --tokenizer")
    return path
