"""Reference log-probs of preference shards: computed once by the reference model (`scalelm score`, or the
first stage of a DPO run that needs them) and stored beside the shards, one value per side of every pair.

    SHARDS/reference/MODEL/manifest.json     the model (its path, and the SHA-256 of its checkpoint manifest),
                                             the precision and layout it was scored in; per split, per shard:
                                             its name and SHA-256, its documents, the values' file and SHA-256
    SHARDS/reference/MODEL/train-000000.npy  (documents,) float64, Σ log p_ref over the targets of each side,
                                             in the shard's stored order (chosen, rejected, chosen, ...)

MODEL is the first 16 hex digits of the model's SHA-256. The values are keyed by shard and document, not by
batch, so the loader hands every pair its own on any layout, after any resume or resize (data/packing.py).
Values made for another shard set, or shards replaced since, are refused by their hashes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from scalelm.data.files import make_dir, sha256_file
from scalelm.data.shards import REFERENCES, ShardSet, read_manifest
from scalelm.errors import DataError

FORMAT = "scalelm-reference"
MANIFEST = "manifest.json"


def reference_dir(source: str | Path, model_sha256: str) -> Path:
    """Where the reference log-probs of the shard set at `source` by the model with this hash live."""
    if "://" in str(source) or str(source).startswith("pipe:"):
        raise DataError(f"{source}: reference log-probs are stored beside the shards, and these are remote: copy "
                        f"them to a local directory, or train with finetune.lora (whose reference is its base)")
    return Path(source) / REFERENCES / model_sha256[:16]


def has_reference(source: str | Path, model_sha256: str) -> bool:
    """Whether reference log-probs by that model are stored beside the shards at `source`."""
    return (reference_dir(source, model_sha256) / MANIFEST).is_file()


def write_reference(source: str | Path, model: dict, scored: dict, values: dict[str, dict[str, np.ndarray]]) -> Path:
    """Store `values` ({split: {shard name: (documents,) float64}}) by `model` ({"path", "sha256"}) for the shard
    set at `source`; `scored` says how (precision, layout). The manifest is written last."""
    out = reference_dir(source, model["sha256"])
    tmp = make_dir(out.with_name(f".{out.name}.tmp"))  # the whole directory at once: an interrupted one is never read
    for old in tmp.iterdir():
        old.unlink()
    splits = {}
    for split, shards in values.items():
        entries = []
        for shard in read_manifest(source, split).shards:
            file = tmp / (shard.name.removesuffix(".tar") + ".npy")
            np.save(file, np.asarray(shards[shard.name], np.float64))
            entries.append({"name": shard.name, "sha256": shard.sha256, "documents": len(shard.lengths),
                            "file": file.name, "file_sha256": sha256_file(file)})
        splits[split] = entries
    manifest = {"format": FORMAT, "model": model, "scored": scored, "splits": splits}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def with_reference(shards: ShardSet, model_sha256: str) -> ShardSet:
    """`shards` with the files of their reference log-probs by that model attached (`ShardSet.reference`);
    raises DataError naming the fix when there are none, or they were made for other shards or another model."""
    where = reference_dir(shards.source, model_sha256)
    manifest = read_reference_manifest(shards.source, model_sha256)
    if manifest["model"]["sha256"] != model_sha256:
        raise DataError(f"{where} holds reference log-probs of another model ({manifest['model']['path']}): "
                        f"score again with `scalelm score`")
    entries = {e["name"]: e for e in manifest["splits"].get(shards.split, [])}
    files = []
    for shard in shards.shards:
        entry = entries.get(shard.name)
        if entry is None or entry["sha256"] != shard.sha256 or entry["documents"] != len(shard.lengths):
            raise DataError(f"{where} was scored on other shards than {shards.source} ({shards.split}, {shard.name}) "
                            f"holds now: score them again with `scalelm score --overwrite`")
        file = where / entry["file"]
        if not file.is_file() or sha256_file(file) != entry["file_sha256"]:
            raise DataError(f"{file} is missing or not the file its manifest lists (SHA-256): score again with "
                            f"`scalelm score --overwrite`")
        files.append(str(file))
    return replace(shards, reference=tuple(files))


def read_reference_manifest(source: str | Path, model_sha256: str) -> dict:
    """The manifest of the reference log-probs of `source` by that model; a DataError saying how to make them."""
    where = reference_dir(source, model_sha256)
    if not (where / MANIFEST).is_file():
        raise DataError(f"{source} has no reference log-probs by this model ({where} is missing): compute them with "
                        f"`scalelm score --config CFG`, or let the DPO run do it first")
    manifest = json.loads((where / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{where / MANIFEST}: not a scalelm reference manifest: score again with `scalelm score --overwrite`")
    return manifest


def manifest_sha256(source: str | Path, model_sha256: str) -> str:
    """The SHA-256 of the reference manifest (which lists every values file's SHA-256): what checkpoints record."""
    return sha256_file(reference_dir(source, model_sha256) / MANIFEST)


def load_values(file: str, documents: int) -> np.ndarray:
    """A shard's reference log-probs, checked for length."""
    try:
        values = np.load(file)
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: unreadable ({e}): score again with `scalelm score --overwrite`") from None
    if values.shape != (documents,):
        raise DataError(f"{file}: holds {values.shape} values, not one for each of {documents} documents: score again "
                        f"with `scalelm score --overwrite`")
    return values
