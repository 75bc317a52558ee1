"""Checkpoints on disk: their names, the atomic commit, verification, retention. Files only, no ranks.

    checkpoint.dir/
      latest                          "step-00001000": the newest committed checkpoint
      step-00001000/
        manifest.json                 written last: step, config, layouts, loader and scheduler state,
                                      the size and SHA-256 of every file beside it, the states each
                                      tensor has (a frozen one its weight alone), and for a LoRA run
                                      its base checkpoint (checkpoint/base.py)
        model-00003.safetensors       whole fp32 weights under single-process names (written by rank 3)
        optimizer-00003.safetensors   AdamW's moments of the same weights: exp_avg/NAME, exp_avg_sq/NAME
        rng-00003.safetensors         rank 3's RNG states
      step-00002000.tmp/              a save in progress, or one that was killed: never read

Every tensor is whole (no shard of it) and lives in exactly one file, so any layout reads what it
needs. A save writes into STEP.tmp and fsyncs each file; `commit` then writes the manifest, renames
the directory into place and only then moves `latest`. A killed save therefore leaves a .tmp
directory and the previous checkpoint untouched. Only safetensors and JSON are read back: loading
a checkpoint never runs code from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import re
import shutil
import struct
import threading
from pathlib import Path
from typing import TypedDict

import torch
from safetensors import SafetensorError, safe_open

from scalelm.data.files import make_dir, sha256_file
from scalelm.errors import CheckpointError

FORMAT, VERSION = "scalelm-checkpoint", 1
MANIFEST, LATEST = "manifest.json", "latest"


class Manifest(TypedDict, total=False):
    """A checkpoint's manifest.json, as `read_manifest` returns it and `write_manifest` writes it (version 1; the
    keys a checkpoint of an older scalelm lacks are absent)."""

    format: str  # FORMAT
    version: int  # VERSION
    step: int
    run: dict  # checkpoint/run_state.py's RunState
    config: dict  # the run's config, as config.to_dict gives it
    objective: str  # the objective it trained with (scalelm/objectives)
    tokenizer_sha256: str | None
    base: dict | None  # a LoRA run's base: {"path", "sha256"} (checkpoint/base.py)
    reference: dict | None  # a DPO run's scored reference log-probs (train/score.py)
    layout: dict  # {"tensor", "pipeline", "data", "world", "zero_stage"} it was saved from
    counters: dict  # parallel/engine.py's Counters
    loader: list  # each data-parallel rank's batch-source state (train/sources.py)
    tensors: dict  # name -> {"model": file, "shape", "states", "optimizer": file}
    files: dict  # file -> {"bytes", "sha256"}
    created: float
    weights_only: bool  # weights alone (`scalelm convert from-hf`): a start, not a run to resume
    source: str  # what a weights-only checkpoint was converted from
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def temp_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}.tmp"


def start(root: Path, step: int) -> Path:
    """An empty STEP.tmp directory to save into (left-overs of a killed save are removed first)."""
    make_dir(root, "checkpoint.dir")
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir(root, step)
    tmp.mkdir()
    return tmp


class TensorWriter:
    """A safetensors file written one tensor at a time, in the order its header lists them, hashed on
    the way and fsynced at the end; so a rank never holds more than the tensor in hand.

        with TensorWriter(path, {"a": ((3, 4), torch.float32), ...}) as out:
            out.write("a", tensor)
        out.record  # {"bytes", "sha256"} for the manifest; None if not every tensor was written

    NOTE: the format (8-byte header length, JSON header padded with spaces, raw little-endian data)
    is written here because safetensors' own writers want every tensor at once, and its `save`
    copies each to Python bytes first (0.2 GB/s on a RAM disk here). Files are read with safetensors.
    """

    def __init__(self, path: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, (shape, dtype) in layout.items():
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self.path, self.layout, self.pending = path, layout, iter(layout)
        self.bytes, self.record = 8 + len(head) + offset, None
        self.file = open(path, "wb")
        self.written = self.flushing = 0  # bytes written, and those written when the disk was last told
        self.digest = hashlib.sha256()
        self.hashing: queue.Queue = queue.Queue(maxsize=4)
        # hashing and writing both release the GIL: the digest is computed while the file is written
        self.hasher = threading.Thread(target=self._hash, daemon=True)
        self.hasher.start()
        self._put(struct.pack("<Q", len(head)) + head)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = next(self.pending, None)
        shape, dtype = self.layout.get(name, (None, None))
        if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{self.path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected} next")
        self._put(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, no copy

    def _put(self, piece) -> None:
        self.hashing.put(piece)
        self.file.write(piece)
        self.written += len(piece)
        if self.written - self.flushing >= _WRITE_BACK:
            self.file.flush()
            _write_back(self.file)
            self.flushing = self.written

    def _hash(self) -> None:
        while (piece := self.hashing.get()) is not None:
            self.digest.update(piece)

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.hashing.put(None)
        self.hasher.join()
        try:
            if exc[0] is None and next(self.pending, None) is None:  # complete: make it durable
                self.file.flush()
                os.fsync(self.file.fileno())
                _write_back(self.file)  # now: every page clean, so every page leaves the cache
                self.record = {"bytes": self.bytes, "sha256": self.digest.hexdigest()}
        finally:
            self.file.close()  # an incomplete file keeps record None: the caller does not list it


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """Write a whole dict of tensors as one safetensors file; its {"bytes", "sha256"}."""
    with TensorWriter(path, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, metadata) as out:
        for name, tensor in tensors.items():
            out.write(name, tensor)
    return out.record


_WRITE_BACK = 64 << 20  # bytes


def _write_back(file) -> None:
    """Ask Linux to write `file`'s dirty pages to disk now, rather than at fsync or after 30 s, and to drop its
    clean ones from the page cache: the disk works while the rest of the file is hashed and written, instead of
    after it (2.5x faster here), and a checkpoint does not push the training data out of the cache, nor make
    the next one wait for fresh pages (3-4x slower on this VM). A hint: elsewhere, nothing happens."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def commit(root: Path, step: int, manifest: dict) -> Path:
    """Write the manifest into STEP.tmp, rename it to STEP and point `latest` at it, each durably."""
    tmp, final = temp_dir(root, step), step_dir(root, step)
    write_manifest(tmp, manifest)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved by an earlier run (train.resume=none over an old directory)
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    _write_durably(root / f"{LATEST}.tmp", final.name + "\n")
    (root / f"{LATEST}.tmp").rename(root / LATEST)
    _fsync_dir(root)
    return final


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` committed checkpoints; the deleted ones."""
    old = committed(root)[keep:]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def committed(root: Path) -> list[Path]:
    """Committed checkpoints under `root`, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), reverse=True)


def resolve(path: Path) -> Path:
    """A checkpoint directory, given it or a checkpoint.dir (whose `latest` is taken)."""
    if (path / MANIFEST).is_file():
        return path
    if (path / LATEST).is_file() and (path / (path / LATEST).read_text().strip() / MANIFEST).is_file():
        return path / (path / LATEST).read_text().strip()
    found = committed(path)
    if found:
        return found[0]
    raise CheckpointError(f"{path}: not a checkpoint, and holds none: give a step-* directory or a checkpoint.dir")


def write_manifest(ckpt: Path, manifest: Manifest) -> None:
    """manifest.json into the checkpoint directory `ckpt`, durably, marked with this format and version."""
    _write_durably(ckpt / MANIFEST, json.dumps({**manifest, "format": FORMAT, "version": VERSION}, indent=1))


def read_manifest(ckpt: Path) -> Manifest:
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {MANIFEST}, so not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt / MANIFEST} is damaged ({e}): use an earlier checkpoint") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / MANIFEST} is not a scalelm checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{ckpt}: checkpoint format version {manifest.get('version')}; "
                              f"this scalelm reads version {VERSION}")
    return manifest


def verify(ckpt: Path, manifest: dict, names: list[str]) -> list[str]:
    """What is wrong with the files `names` of a checkpoint (size and SHA-256); empty when nothing."""
    problems = []
    for name in names:
        path, want = ckpt / name, manifest["files"][name]
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, not {want['bytes']} (truncated?)")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{name} does not match its SHA-256 (damaged)")
    return problems


class TensorReader:
    """Whole tensors of a checkpoint by (kind, name), kind param / exp_avg / exp_avg_sq; files open lazily."""

    def __init__(self, ckpt: Path, manifest: dict):
        self.ckpt, self.tensors = ckpt, manifest["tensors"]
        self._open: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, kind: str, name: str) -> torch.Tensor:
        entry = self.tensors.get(name)
        if entry is None:
            raise CheckpointError(f"{self.ckpt}: no tensor {name}: the checkpoint holds another model")
        file = entry["model"] if kind == "param" else entry["optimizer"]
        return self._tensor(file, name if kind == "param" else f"{kind}/{name}")

    def _tensor(self, file: str, key: str) -> torch.Tensor:
        try:
            if file not in self._open:
                self._open[file] = safe_open(self.ckpt / file, framework="pt")
            return self._open[file].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.ckpt / file}: cannot read {key} ({e})") from None


def read_weights(path: Path, check: bool = True) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(checkpoint, manifest, every whole fp32 weight) of the checkpoint at `path` (a step directory, or a
    checkpoint.dir: its latest), its files verified against the manifest first unless `check` is False."""
    ckpt = resolve(path)
    manifest = read_manifest(ckpt)
    if check:
        problems = verify(ckpt, manifest, sorted(manifest["files"]))
        if problems:
            raise CheckpointError(f"checkpoint {ckpt} failed verification: {problems[0]}")
    reader = TensorReader(ckpt, manifest)
    return ckpt, manifest, {name: reader.get("param", name) for name in reader.names()}


def read_rank_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a small per-rank file (the RNG states)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
