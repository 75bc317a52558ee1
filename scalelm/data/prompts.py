"""Prompt shards read back (`scalelm shard --prompts`, data/prompt_shards.py): what an RL run samples completions of.

A `PromptSet` holds every prompt of one split of its sources in memory, the sources blended by concatenation in the
order given, and hands them out in a shuffled order, epoch after epoch: epoch e is the permutation of
`numpy.random.default_rng([seed, e])`, so `state_dict()` (epoch, position) resumes exactly. It is the same on every
data-parallel rank: the RL batch source splits the work itself.

NOTE: prompts are few beside pretraining text (thousands to a few million), so each shard is read whole, its
SHA-256 checked against the manifest, and the set kept in memory; a `Prompt` is made when it is handed out.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds

from scalelm.data.chat import TEMPLATE_SHA256
from scalelm.data.shards import KINDS, Shard, read_manifest
from scalelm.errors import DataError


@dataclass(frozen=True)
class Prompt:
    """One prompt: the ids a model continues, and what the reward function reads."""

    ids: tuple[int, ...]  # BOS and the text; or for a chat, the template up to the assistant's header
    prompt: str | list[dict]  # the text, or the messages [{role, content}]
    answer: str | None  # the reference answer, if the record had one
    metadata: dict  # the record's metadata ({} if none)
    chat: bool  # whether `prompt` is messages in the chat template


class PromptSet:
    """Every prompt of `split` of the prompt shard sets `sources`, handed out `take(n)` at a time in a shuffled
    order (in stored order with shuffle=False, as for val)."""

    def __init__(self, sources: Sequence[str | Path], split: str, tokenizer_sha256: str | None = None, seed: int = 0,
                 shuffle: bool = True):
        if not sources:
            raise DataError(f"no {split} prompts: give a directory written by `scalelm shard --prompts`")
        sets = [read_manifest(str(s), split, tokenizer_sha256) for s in sources]
        for s in sets:
            if not s.prompts:
                raise DataError(f"{s.source} holds {KINDS[s.kind].what}, not prompts: write prompts with "
                                f"{KINDS['prompts'].command}")
            if s.chat["template_sha256"] not in (None, TEMPLATE_SHA256):
                raise DataError(f"{s.source} was made with another chat template than this scalelm's: re-create it "
                                f"with `scalelm shard --prompts`")
            if s.tokenizer_sha256 != sets[0].tokenizer_sha256:
                raise DataError(f"{s.source} and {sets[0].source} were made with different tokenizers: blend only "
                                f"prompt shards made with the same one")
        tokens, self.records = [], []
        for s in sets:
            for shard in s.shards:
                ids, records = read_prompt_shard(shard, s.dtype)
                tokens.append(ids)
                self.records += records
        if not self.records:
            raise DataError(f"{', '.join(map(str, sources))}: no {split} prompts"
                            + (": shard with a larger --val-fraction" if split == "val" else ""))
        self.tokens = np.concatenate(tokens)
        self.lengths = np.asarray([r["length"] for r in self.records], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def longest(self) -> int:
        """The longest prompt's ids."""
        return int(self.lengths.max())

    def __getitem__(self, index: int) -> Prompt:
        """The prompt at `index` in the blended stored order."""
        record = self.records[index]
        ids = self.tokens[self.starts[index] : self.starts[index + 1]]
        return Prompt(tuple(ids.tolist()), record["prompt"], record["answer"], record["metadata"],
                      isinstance(record["prompt"], list))

    def take(self, n: int) -> list[tuple[int, Prompt]]:
        """The next `n` prompts as (index, prompt), going on into the next epoch when this one runs out."""
        if n < 0:
            raise ValueError(f"take({n}): n must be 0 or more")
        taken = []
        while len(taken) < n:
            step = min(n - len(taken), len(self) - self.position)
            taken += [(int(i), self[int(i)]) for i in self._order[self.position : self.position + step]]
            self.position += step
            if self.position == len(self):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return taken

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "prompts": len(self)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state_dict()` was taken; a state of another set of prompts is refused."""
        try:
            epoch, position, count = int(state["epoch"]), int(state["position"]), int(state["prompts"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"a prompt state {state!r}: not one PromptSet.state_dict() wrote") from None
        if count != len(self) or not 0 <= position < count or epoch < 0:
            raise DataError(f"a prompt state of {count:,} prompts (epoch {epoch}, position {position}), and these sources "
                            f"hold {len(self):,}: resume with the prompts the run started with")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))


def read_prompt_shard(shard: Shard, dtype: np.dtype) -> tuple[np.ndarray, list[dict]]:
    """(ids back to back, per prompt its record) of one prompt shard, checked against its manifest entry."""
    def bad(why: str) -> DataError:
        return DataError(f"{shard.url}: {why}: re-create it with `scalelm shard --prompts`")

    try:
        with wds.gopen(shard.url, "rb") as f:
            data = f.read()
    except OSError as e:
        raise bad(f"cannot be read ({' '.join(str(e).split())})") from None
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise bad("sha256 differs from the manifest (corrupt, or replaced after it was written)")
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
        ids = [np.frombuffer(samples[key]["tokens"], dtype) for key in sorted(samples)]
        records = [r for key in sorted(samples) for r in json.loads(samples[key]["json"])]
        lengths = [r["length"] for r in records]
    except (tarfile.TarError, KeyError, TypeError, ValueError) as e:
        raise bad(f"corrupt or not a prompt shard ({type(e).__name__}: {e})") from None
    ids = np.concatenate(ids) if ids else np.empty(0, dtype)
    if lengths != list(shard.lengths or ()) or ids.size != shard.tokens:
        raise bad(f"holds {len(records)} prompts of {ids.size} ids, and its manifest lists {len(shard.lengths or ())} of "
                  f"{shard.tokens}")
    return ids, records

