"""The token-shard format: WebDataset tars of pre-tokenized text plus one manifest.json.

    SHARDS/
      manifest.json          dtype, tokenizer sha256, per shard: name, split, tokens, bytes, sha256
      train-000000.tar ...   samples `{key}.tokens`: raw little-endian uint16/uint32 token ids
      val-000000.tar ...

A sample is a chunk of whole documents, each followed by EOS, so packing at train time is a plain
concatenation. Chunks (about a million characters of text each) rather than one sample per document
keep per-sample tar overhead off the loader's hot path. Documents go to val by a hash of their text,
so the split is stable whatever the order or the number of cores.

Chat shards (`kind: chat`, written by data/chat_shards.py) hold conversations instead: beside
`{key}.tokens` a `{key}.flags` byte per token (what it is a target for, data/chat.py), and the
manifest lists each shard's conversation lengths, from which the loader packs them into windows.
Preference shards (data/preference_shards.py) are chat shards of pairs; labelled shards
(data/labelled_shards.py) hold texts, the manifest listing each one's class beside its length. Prompt shards
(data/prompt_shards.py) hold prompts for RL, beside `{key}.tokens` a `{key}.json` list of each one's text and answer.

`write_shards` tokenizes on every core; `read_manifest` and `read_shard` are the reading side the
loader uses, over local paths or any URL WebDataset opens (http(s)://, pipe:, gs://, ...).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds
from tqdm import tqdm

from scalelm.data.files import make_dir, sha256_file
from scalelm.data.readers import list_input_files, read_documents
from scalelm.data.tokenizer import encode_documents, load_tokenizer
from scalelm.data.workers import BATCH_CHARS, batches_of_text, default_workers, imap_ordered
from scalelm.errors import DataError

FORMAT = "scalelm-shards"
VERSION = 1
MANIFEST = "manifest.json"
REFERENCES = "reference"  # the folder beside the shards that data/reference.py writes
SPLITS = ("train", "val")


# --------------------------------------------------------------------------- writing


def parse_size(text: str) -> int:
    """'256MB' -> 268435456 (binary units: KB, MB, GB, TB, with or without the i); plain numbers are bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not match:
        raise DataError(f"size {text!r} is not understood: write e.g. 256MB, 1GB or 1048576")
    number, unit = match.groups()
    return int(float(number) * (1 << (10 * " KMGT".index(unit or " "))))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_val(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a hash of its text, not its position."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


def write_shards(inputs: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *,
                 shard_size: int = 256 << 20, val_fraction: float = 0.01, workers: int | None = None,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize the documents in `inputs` into train/val tar shards under `out`; returns the manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    sp = load_tokenizer(tokenizer)
    files = list_input_files(inputs)
    if not files:
        raise DataError(f"no readable files in {', '.join(map(str, inputs))}: run `scalelm prepare` first")
    dtype = token_dtype(sp.vocab_size())
    writer = ShardSetWriter(Path(out), dtype=dtype, vocab_size=sp.vocab_size(), eos_id=sp.eos_id(),
                            tokenizer={"file": str(tokenizer), "sha256": sha256_file(tokenizer)},
                            shard_size=shard_size, overwrite=overwrite)
    # About 4 characters make a 2-byte token: chunks of shard_size / 2 characters take about a
    # quarter shard, so even small shards hold several.
    chunks = batches_of_text((t for t in read_documents(files) if t), min(BATCH_CHARS, shard_size // 2))
    jobs = ((chunk, val_fraction, dtype.str) for chunk in chunks)
    with tqdm(desc="shard", unit=" tok", unit_scale=True, disable=not progress, mininterval=1.0) as bar:
        for parts in imap_ordered(_tokenize_chunk, jobs, workers or default_workers(), _init_worker, (str(tokenizer),)):
            for split, (tokens, n_docs) in parts.items():
                writer.write(split, tokens, n_docs)
                bar.update(len(tokens))
    if writer.documents == 0:
        raise DataError(f"no documents in {', '.join(map(str, inputs))}: nothing to shard")
    return writer.close(val_fraction=val_fraction, inputs=[str(p) for p in inputs])


class ShardSetWriter:
    """A shard set in the making: each split's tars rolled over at `shard_size`, the manifest last."""

    def __init__(self, out: Path, *, dtype: np.dtype, vocab_size: int, eos_id: int, tokenizer: dict,
                 shard_size: int = 256 << 20, overwrite: bool = False):
        if shard_size < 1 << 16:
            raise DataError(f"--shard-size {shard_size} bytes is too small: use at least 64KB")
        if (out / MANIFEST).exists() and not overwrite:
            raise DataError(f"{out} already holds shards: choose another --out or pass --overwrite")
        make_dir(out)
        for old in [*out.glob("train-*.tar"), *out.glob("val-*.tar"), out / MANIFEST]:
            old.unlink(missing_ok=True)
        shutil.rmtree(out / REFERENCES, ignore_errors=True)  # DPO's log-probs of the shards replaced (data/reference.py)
        self.out = out
        self.header = {"format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
                       "eos_id": eos_id, "tokenizer": tokenizer}
        self.sinks = {split: _ShardSink(out, split, shard_size) for split in SPLITS}
        self.split_documents = {split: 0 for split in SPLITS}

    @property
    def documents(self) -> int:
        return sum(self.split_documents.values())

    def write(self, split: str, tokens: np.ndarray, documents: int, flags: np.ndarray | None = None,
              lengths: Sequence[int] | None = None, classes: Sequence[int] | None = None,
              records: Sequence[dict] | None = None) -> None:
        """One chunk: `documents` whole documents' tokens, each followed by EOS; or, for chat shards,
        conversations back to back with their `flags` and `lengths` (and for labelled texts their `classes`;
        for prompts, no flags and their `records`, stored as `{key}.json`)."""
        if documents:
            self.sinks[split].write(tokens, flags, lengths, classes, records)
            self.split_documents[split] += documents

    def close(self, splits: dict[str, dict] | None = None, **extra) -> dict:
        """Finish the tars, then write manifest.json (with `extra` fields, and `splits` fields per split);
        returns the manifest."""
        manifest = {**self.header, **extra, "splits": {
            split: {"documents": self.split_documents[split], **(splits or {}).get(split, {}), **sink.close()}
            for split, sink in self.sinks.items()}}
        tmp = self.out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.rename(self.out / MANIFEST)  # last: a directory without a manifest is not a shard set
        return manifest


class _ShardSink:
    """One split's tar files, rolled over at `shard_size` bytes, with per-shard accounting."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._bytes = 0

    def write(self, tokens: np.ndarray, flags: np.ndarray | None = None, lengths: Sequence[int] | None = None,
              classes: Sequence[int] | None = None, records: Sequence[dict] | None = None) -> None:
        if self._writer is None or self._bytes >= self.shard_size:
            self._roll()
        entry = self.shards[-1]
        sample = {"__key__": f"{entry['chunks']:08d}", "tokens": tokens.tobytes()}
        if flags is not None:
            sample["flags"] = flags.astype(np.uint8).tobytes()
        if lengths is not None:
            entry.setdefault("lengths", []).extend(int(n) for n in lengths)
        if classes is not None:
            entry.setdefault("classes", []).extend(int(c) for c in classes)
        if records is not None:
            sample["json"] = json.dumps(list(records)).encode()
        self._writer.write(sample)
        entry["chunks"] += 1
        entry["tokens"] += int(tokens.size)
        payload = tokens.nbytes + (0 if flags is None else flags.size) + len(sample.get("json", b""))
        self._bytes += payload + 1024  # plus tar headers

    def close(self) -> dict:
        self._finish()
        return {"tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}

    def _roll(self) -> None:
        self._finish()
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.out / f".{name}.tmp"
        self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=0)  # mtime 0: same input, same bytes
        self._bytes = 0
        self.shards.append({"name": name, "tokens": 0, "chunks": 0})

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        entry = self.shards[-1]
        final = self.out / entry["name"]
        self._tmp.rename(final)
        entry["bytes"] = final.stat().st_size
        entry["sha256"] = sha256_file(final)
        self._writer = None


_worker_sp = None


def _init_worker(tokenizer: str) -> None:
    global _worker_sp  # NOTE: per-process tokenizer of a pool worker, loaded once
    _worker_sp = load_tokenizer(tokenizer)


def _tokenize_chunk(args: tuple[list[str], float, str]) -> dict[str, tuple[np.ndarray, int]]:
    """Worker: encode a chunk of documents; each split's documents concatenated, each followed by EOS."""
    texts, val_fraction, dtype = args
    eos = _worker_sp.eos_id()
    held_out = [is_val(t, val_fraction) for t in texts]
    parts = {}
    for split in SPLITS:
        docs = [t for t, v in zip(texts, held_out) if v == (split == "val")]
        parts[split] = (encode_documents(_worker_sp, docs, eos=eos, dtype=np.dtype(dtype)), len(docs))
    return parts


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Shard:
    url: str
    tokens: int
    sha256: str
    lengths: tuple[int, ...] | None = None  # chat shards: each conversation's tokens, in stored order
    classes: tuple[int, ...] | None = None  # labelled texts: each text's class, in stored order

    @property
    def name(self) -> str:
        """The shard's file name (train-000000.tar)."""
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ShardSet:
    """One split of a shard directory, as its manifest describes it."""

    source: str
    split: str
    dtype: np.dtype
    eos_id: int
    vocab_size: int
    tokenizer_sha256: str
    shards: tuple[Shard, ...]
    chat: dict | None = None  # chat shards: the manifest's `chat` entry (template sha256, seq_len, targets)
    reference: tuple[str, ...] | None = None  # preference shards: per shard, its reference log-probs (data/reference.py)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def pairs(self) -> bool:
        """Preference shards (`scalelm shard --preference`): documents 2k and 2k + 1 are pair k's two sides."""
        return bool(self.chat and self.chat.get("pairs"))

    @property
    def labels(self) -> list[str] | None:
        """Labelled texts (`scalelm shard --labels`): the class names, by class id; None for other shards."""
        return self.chat.get("labels") if self.chat else None

    @property
    def prompts(self) -> bool:
        """Prompts for RL (`scalelm shard --prompts`, read by data/prompts.py), not windows to train on."""
        return bool(self.chat and self.chat.get("prompts"))

    @property
    def kind(self) -> str:
        """What the shards hold, a key of KINDS: text, chat, pairs, labels or prompts."""
        return ("pairs" if self.pairs else "prompts" if self.prompts else "labels" if self.labels is not None
                else "chat" if self.chat else "text")


@dataclass(frozen=True)
class Kind:
    what: str  # the shards, in words
    holds: str  # what each of their documents is
    command: str  # the command that writes them


# The kinds of shard sets `scalelm shard` writes; an objective names the one it trains on (scalelm/objectives).
KINDS = {"text": Kind("text shards", "documents", "`scalelm shard`"),
         "chat": Kind("chat shards", "conversations", "`scalelm shard --chat`"),
         "pairs": Kind("preference pairs", "preference pairs", "`scalelm shard --preference`"),
         "labels": Kind("labelled texts", "labelled texts", "`scalelm shard --labels`"),
         "prompts": Kind("prompt shards", "prompts", "`scalelm shard --prompts`")}


def join_url(source: str, name: str) -> str:
    return f"{source.rstrip('/')}/{name}"


def read_manifest(source: str | Path, split: str, tokenizer_sha256: str | None = None) -> ShardSet:
    """The `split` of the shard set at `source` (a directory or URL prefix), checked against the tokenizer.

    A URL may be anything WebDataset opens; a `pipe:` command must end with the location, since
    file names are appended to it (`pipe:curl -s https://host/shards`)."""
    source = str(source)
    url = join_url(source, MANIFEST)
    scheme = source.split("://")[0] if "://" in source else None
    if scheme and scheme != "file" and scheme not in wds.gopen_schemes:
        raise DataError(f"{source}: WebDataset has no reader for {scheme}:// URLs; use https:// or gs://, or a "
                        f"pipe: command that ends with the location (e.g. pipe:curl -s https://host/shards)")
    if scheme is None and not source.startswith("pipe:") and not Path(url).is_file():
        if not Path(source).exists():
            raise DataError(f"shard directory not found: {source}: check the path (written by `scalelm shard --out`)")
        raise DataError(f"{url} is missing: {source} was not written by `scalelm shard` (or the run did not finish)")
    try:
        with wds.gopen(url, "rb") as f:
            manifest = json.loads(f.read())
    except OSError:
        raise DataError(f"{url}: cannot be read: check the address (is it a directory written by `scalelm shard`?)") from None
    except ValueError as e:
        raise DataError(f"{url}: not a manifest ({' '.join(str(e).split())}): re-create it with `scalelm shard`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{url}: not a scalelm-shards v{VERSION} manifest; re-create the shards with `scalelm shard`")
    try:
        made_with = manifest["tokenizer"]["sha256"]
        if tokenizer_sha256 is not None and made_with != tokenizer_sha256:
            raise DataError(
                f"{source} was made with another tokenizer (sha256 {made_with[:12]}…, {manifest['tokenizer']['file']}) "
                f"than data.tokenizer (sha256 {tokenizer_sha256[:12]}…): re-shard with this tokenizer or point "
                f"data.tokenizer at the one used")
        if split not in manifest["splits"]:
            raise DataError(f"{url}: has no {split!r} split (has {', '.join(manifest['splits'])})")
        shards = tuple(Shard(join_url(source, s["name"]), s["tokens"], s["sha256"],
                             tuple(s["lengths"]) if "lengths" in s else None,
                             tuple(s["classes"]) if "classes" in s else None)
                       for s in manifest["splits"][split]["shards"])
        chat = manifest.get("chat")
        if chat is not None:  # the split's figures beside the set's (a prompt set's `prompts` stays True)
            keys = ("longest", "with_answer") if chat.get("prompts") else ("targets", "truncated", "dropped_overlong")
            chat = {**chat, **{k: manifest["splits"][split][k] for k in keys}}
        return ShardSet(source, split, np.dtype(manifest["dtype"]), manifest["eos_id"], manifest["vocab_size"],
                        made_with, shards, chat)
    except (KeyError, TypeError) as e:
        raise DataError(f"{url}: malformed manifest (missing {e}); re-create the shards with `scalelm shard`") from None


def read_shard(shard: Shard, dtype: np.dtype) -> np.ndarray:
    """All token ids of one shard, in stored order; a corrupt or truncated shard raises DataError."""
    return read_shard_fields(shard, {"tokens": dtype})["tokens"]


def read_shard_fields(shard: Shard, fields: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """Per field ("tokens", and "flags" in chat shards), one value per token of the shard, in stored order."""
    arrays = {name: np.empty(shard.tokens, dtype=dtype) for name, dtype in fields.items()}
    filled = 0
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": shard.url}]):
            chunks = {name: np.frombuffer(sample[name], dtype=dtype) for name, dtype in fields.items()}
            size = chunks["tokens"].size
            if filled + size > shard.tokens or any(c.size != size for c in chunks.values()):
                raise DataError(f"{shard.url}: holds more tokens than its manifest says ({shard.tokens}): it was "
                                f"replaced after `scalelm shard` wrote the manifest; re-create the shard set")
            for name, chunk in chunks.items():
                arrays[name][filled : filled + size] = chunk
            filled += size
    except (tarfile.TarError, OSError, KeyError, ValueError) as e:
        reason = e.args[0] if e.args and isinstance(e.args[0], str) else type(e).__name__  # webdataset appends the url
        raise DataError(f"{shard.url}: corrupt or unreadable shard ({reason}): "
                        f"re-create it with `scalelm shard`, or set data.on_bad_shard=skip") from None
    if filled != shard.tokens:
        raise DataError(f"{shard.url}: truncated, {filled} of the {shard.tokens} tokens its manifest lists: "
                        f"re-create it with `scalelm shard`, or set data.on_bad_shard=skip")
    return arrays
