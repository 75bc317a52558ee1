"""Exact and near-duplicate detection over cleaned documents.

Exact: a 128-bit BLAKE2b digest of the cleaned text. Near: MinHash signatures of word 5-gram
shingles, looked up in a MinHash LSH index (datasketch); the first document of a near-duplicate
group is kept, later ones are dropped.
"""

from __future__ import annotations

import hashlib

import numpy as np
from datasketch import MinHash, MinHashLSH

NUM_PERM = 128
SHINGLE_WORDS = 5
SCHEME = "affine32"  # datasketch's permutation scheme; signatures are rebuilt with the same one


def digest(text: str) -> bytes:
    """Identity of a cleaned document for exact deduplication."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def minhash_signature(text: str, num_perm: int = NUM_PERM) -> np.ndarray:
    """MinHash of the lower-cased word 5-grams of `text` (whole text if it is shorter)."""
    words = text.lower().split()
    n = max(1, len(words) - SHINGLE_WORDS + 1)
    shingles = {" ".join(words[i : i + SHINGLE_WORDS]).encode() for i in range(n)}
    mh = MinHash(num_perm=num_perm, scheme=SCHEME)
    mh.update_batch(list(shingles))
    return mh.hashvalues


class Deduplicator:
    """Remembers what it has kept; `check()` says whether a document is new or why not."""

    def __init__(self, mode: str = "minhash", threshold: float = 0.8, num_perm: int = NUM_PERM):
        if mode not in ("none", "exact", "minhash"):
            raise ValueError(f"dedup mode {mode!r}")
        self.mode = mode
        self.num_perm = num_perm
        self._seen: set[bytes] = set()
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if mode == "minhash" else None
        self._count = 0

    def check(self, key: bytes, signature: np.ndarray | None) -> str | None:
        """None if the document is new (and now remembered), else 'exact_duplicate' or 'near_duplicate'."""
        if self.mode == "none":
            return None
        if key in self._seen:
            return "exact_duplicate"
        if self._lsh is not None:
            mh = MinHash(num_perm=self.num_perm, hashvalues=signature, scheme=SCHEME)
            if self._lsh.query(mh):
                return "near_duplicate"
            self._lsh.insert(str(self._count), mh)
            self._count += 1
        self._seen.add(key)
        return None
