"""LoRA checkpoints made without training: random adapters (B nonzero, so the merge changes the model) in a checkpoint
directory whose manifest names a trained model as its base, as a LoRA run saves one."""

import json
import math
from pathlib import Path

import torch

from scalelm.checkpoint import base as base_checkpoint
from scalelm.checkpoint import store
from scalelm.config import from_dict
from scalelm.config.finetune import layer_sides
from scalelm.model import lora

ALL = ["qkv", "proj", "fc1", "fc2"]


def lora_checkpoint(base: Path, root: Path, targets: list[str], rank: int = 4, alpha: float = 8.0, rslora: bool = False,
                    seed: int = 0, base_path: str | None = None) -> Path:
    """The checkpoint.dir of a LoRA checkpoint on `base` holding random adapters, saved as a LoRA run saves one;
    `base_path` records another path for the base (its SHA-256 stays the real one's)."""
    ckpt = store.resolve(base)
    manifest = store.read_manifest(ckpt)
    model = from_dict({"model": manifest["config"]["model"]}).model
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for i in range(model.num_layers):
        for target in targets:
            fan_in, fan_out = layer_sides(model, target)
            name = f"blocks.{i}.layer.{lora.TARGETS[target]}.lora."
            adapters[name + "a"] = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
            adapters[name + "b"] = torch.randn(fan_out, rank, generator=generator) * 0.5 / math.sqrt(rank)
    tmp = store.start(root, 1)
    record = store.write_tensors(tmp / "model-00000.safetensors", adapters)
    config = json.loads(json.dumps(manifest["config"]))
    config.setdefault("finetune", {})["lora"] = {"rank": rank, "alpha": alpha, "dropout": 0.0, "targets": targets,
                                                 "rslora": rslora}
    config["train"]["init_from"] = str(ckpt)
    recorded = base_checkpoint.base_of(ckpt)
    store.commit(root, 1, {
        "step": 1, "config": config, "tokenizer_sha256": manifest.get("tokenizer_sha256"),
        "base": {**recorded, "path": base_path or recorded["path"]},
        "tensors": {name: {"model": "model-00000.safetensors", "shape": list(t.shape), "states": ["param"]}
                    for name, t in adapters.items()},
        "files": {"model-00000.safetensors": record}})
    return root
