"""`scalelm inspect`: what a shard set holds, and with --verify whether every shard is intact."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import webdataset as wds

from scalelm.data.files import sha256_file
from scalelm.data.shards import SPLITS, read_manifest, read_shard
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import DataError


def inspect_shards(source: str, verify: bool = False, tokenizer: str | Path | None = None) -> Iterator[str]:
    """Lines describing the shard set at `source`; raises DataError after listing any bad shard."""
    sets = [read_manifest(source, split) for split in SPLITS]
    first = sets[0]
    yield (f"{source}: {first.dtype.name} tokens, vocabulary {first.vocab_size}, eos {first.eos_id}, "
           f"tokenizer sha256 {first.tokenizer_sha256[:12]}…")
    for s in sets:
        count = sum(len(shard.lengths) for shard in s.shards) if s.chat else 0
        chat = (f" ({count:,} prompts, {s.chat['with_answer']:,} with answers, the longest {s.chat['longest']:,} tokens)"
                if s.prompts else f" ({count:,} conversations of up to {s.chat['seq_len']} tokens, "
                f"{s.chat['targets']['assistant']:,} assistant targets)" if s.chat else "")
        yield f"  {s.split}: {s.tokens:,} tokens in {len(s.shards)} shards{chat}"
    if tokenizer is not None and first.shards:
        sp = load_tokenizer(tokenizer)
        if sha256_file(tokenizer) != first.tokenizer_sha256:
            raise DataError(f"{tokenizer} is not the tokenizer {source} was made with (sha256 "
                            f"{first.tokenizer_sha256[:12]}…): decode with that one")
        sample = read_shard(first.shards[0], first.dtype)[: first.shards[0].lengths[0] if first.prompts else 64].tolist()
        yield f"  first {'prompt' if first.prompts else 'tokens'} of {Path(first.shards[0].url).name}: {sp.decode(sample)!r}"
    if verify:
        bad = 0
        for s in sets:
            for shard in s.shards:
                try:
                    read_shard(shard, s.dtype)
                    if _sha256_url(shard.url) != shard.sha256:
                        raise DataError(f"{shard.url}: sha256 differs from the manifest")
                    yield f"  ok   {shard.url}"
                except DataError as e:
                    bad += 1
                    yield f"  BAD  {e}"
        total = sum(len(s.shards) for s in sets)
        if bad:
            raise DataError(f"{bad} of {total} shards in {source} failed verification: re-create them with `scalelm shard`")
        yield f"all {total} shards verified"


def _sha256_url(url: str) -> str:
    h = hashlib.sha256()
    with wds.gopen(url, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
