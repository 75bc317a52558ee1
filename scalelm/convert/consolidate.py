"""`scalelm checkpoint consolidate CKPT --out model.safetensors`: one unsharded weight file, single-process
names, fp32 (the master weights), whatever layout saved the checkpoint. The input of the conversion tools.

The file's metadata carries what a reader needs to rebuild the model: the model config (JSON), the
tokenizer's vocabulary size (the embedding rows beyond it are padding), the tokenizer's SHA-256 and
the step. Works on files alone: no process group, CPU only.
"""

from __future__ import annotations

import json
from pathlib import Path

from scalelm.checkpoint import store
from scalelm.convert.source import CONSOLIDATED, read_model
from scalelm.data.files import make_dir
from scalelm.errors import CheckpointError


def consolidate(path: Path, out: Path, verify: bool = True, base: Path | None = None) -> dict:
    """Write `out` from the checkpoint at `path` (a step directory, or a checkpoint.dir: its latest). A LoRA
    checkpoint's adapters are merged into its base's weights (found at `base`, or where the checkpoint names it)."""
    ckpt, manifest, weights = store.read_weights(path, check=verify)
    if not weights:
        raise CheckpointError(f"checkpoint {ckpt} holds no weights")
    if manifest.get("base"):  # adapters merged into their base's weights
        weights = read_model(ckpt, verify=verify, base=base, tokenizer_needed=False).weights
    config = manifest["config"]
    metadata = {"format": CONSOLIDATED, "model": json.dumps(config["model"]), "step": str(manifest["step"]),
                "vocab_size": str(config["model"]["vocab_size"] or ""), "tokenizer_sha256": manifest["tokenizer_sha256"] or "",
                "tokenizer": config.get("data", {}).get("tokenizer") or ""}
    make_dir(out.parent if str(out.parent) else Path("."), "--out")
    record = store.write_tensors(out, weights, metadata)
    return {"checkpoint": str(ckpt), "step": manifest["step"], "tensors": len(weights),
            "parameters": sum(t.numel() for t in weights.values()), **record}
