"""A LoRA checkpoint's base: the checkpoint its frozen weights are, named by path and by SHA-256.

A LoRA run saves its adapters and their optimizer state only; the manifest's `base` says where the rest is:

    "base": {"path": "runs/demo/tiny/checkpoints/step-00001400", "sha256": "<SHA-256 of its manifest.json>"}

The manifest lists the size and SHA-256 of every file of its checkpoint, so its own hash names the weights
exactly. A checkpoint started from a LoRA checkpoint has that one's base. Training, resuming, evaluation and
every export find the base through `locate`, which refuses one whose hash differs from the recorded one.
"""

from __future__ import annotations

from pathlib import Path

from scalelm.checkpoint import store
from scalelm.data.files import sha256_file
from scalelm.errors import CheckpointError


def base_of(path: Path) -> dict:
    """The base record of weights at `path` (a checkpoint, or a checkpoint.dir): the checkpoint itself, or, for
    a LoRA checkpoint, its base."""
    ckpt = store.resolve(Path(path))
    manifest = store.read_manifest(ckpt)
    if manifest.get("base"):
        return manifest["base"]
    return {"path": str(ckpt), "sha256": sha256_file(ckpt / store.MANIFEST)}


def locate(record: dict, given: Path | None, what: str, flag: str) -> tuple[Path, dict]:
    """(checkpoint, manifest) of the base `record` names, found at `given` or else at the recorded path; a
    CheckpointError when it is not there or is other weights. `what` is the LoRA checkpoint, `flag` how to
    give another path."""
    path = Path(given) if given else Path(record["path"])
    try:
        found = base_of(path)
    except CheckpointError as e:
        raise CheckpointError(f"{what} holds LoRA adapters for the base {record['path']}, which cannot be read at "
                              f"{path} ({e}): give its path with {flag}") from None
    if found["sha256"] != record["sha256"]:
        raise CheckpointError(f"{path} is not the base {what} was trained on (the SHA-256 of its manifest differs): "
                              f"give that base with {flag}")
    ckpt = Path(found["path"])
    return ckpt, store.read_manifest(ckpt)
