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
    """The base record of weights at `path` (a checkpoint, or a checkpoint.dir: its newest): the checkpoint
    itself, by absolute path, or, for a LoRA checkpoint, its base."""
    ckpt = store.resolve(Path(path)).resolve()
    manifest = store.read_manifest(ckpt)
    if manifest.get("base"):
        return manifest["base"]
    return {"path": str(ckpt), "sha256": sha256_file(ckpt / store.MANIFEST)}


def locate(record: dict, given: Path | None, what: str, flag: str) -> tuple[Path, dict]:
    """(checkpoint, manifest) of the base `record` names: at `given` when given (which must hold that base, unless
    it is the checkpoint.dir the recorded step directory lies in, whose newest has moved on since), else at the
    recorded path. A CheckpointError when it is not there or is other weights; `what` is the LoRA checkpoint,
    `flag` how to give another path."""
    recorded = Path(record["path"])
    if given is not None:
        found, problem = _read(Path(given))
        if found is not None and found["sha256"] == record["sha256"]:
            return _opened(Path(found["path"]))
        same_run = recorded.parent == Path(given).resolve()
        if same_run and (_read(recorded)[0] or {}).get("sha256") == record["sha256"]:
            return _opened(recorded)
        if found is None:
            raise CheckpointError(f"{what} holds LoRA adapters for the base {recorded}, and {given} cannot be read "
                                  f"({problem})")
        raise CheckpointError(f"{given} is not the base {what} was trained on ({recorded}; the SHA-256 of its manifest "
                              f"differs): give that base with {flag}")
    found, problem = _read(recorded)
    if found is None:
        raise CheckpointError(f"{what} holds LoRA adapters for the base {recorded}, which cannot be read ({problem}): "
                              f"give its path with {flag}")
    if found["sha256"] != record["sha256"]:
        raise CheckpointError(f"{recorded} is no longer the base {what} was trained on (the SHA-256 of its manifest "
                              f"differs): give that base with {flag}")
    return _opened(recorded)


def _read(path: Path) -> tuple[dict | None, str | None]:
    try:
        return base_of(path), None
    except CheckpointError as e:
        return None, str(e)


def _opened(ckpt: Path) -> tuple[Path, dict]:
    return ckpt, store.read_manifest(ckpt)
