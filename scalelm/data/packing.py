"""Windows of packed documents: which conversations share a window, and what the model sees of each.

Conversations are packed in the order a shard stores them (next-fit): a window takes whole
conversations while they fit in seq_len tokens (the two sides of a preference pair, stored one after the
other, go into a window together), so every window is a contiguous run of the shard's
tokens, padded at its tail only. The windows of a shard are a function of its conversation lengths
and seq_len alone, which is what lets the loader count, shuffle, shard and resume them exactly like
the fixed-stride windows of text shards.

In a window, each document (a conversation, or with `data.document_mask` a document of text shards)
is on its own: its positions start at 0, its `document_ids` differ from its neighbours' (the model
attends within a document only, model/attention.py), and no label crosses into the next one.

    input_ids     t0 t1 t2 | u0 u1 | pad pad        (b, L)
    position_ids  0  1  2  | 0  1  | 0   1
    document_ids  0  0  0  | 1  1  | 2   2
    labels        t1 t2 -  | u1 -  | -   -          (- : 0, and loss_mask false)
    loss_mask     the next token's flag under finetune.train_on

A window of preference pairs is laid out the same way, documents 2k and 2k + 1 being pair k's chosen and
rejected sides; with reference log-probs (`reference`, one per document, data/reference.py) the window also
carries them, in the column of each document's id:

    reference     r0 r1 r2 r3 0 ...                 (L,) float32: document d's reference log-prob at column d

and a window of labelled texts (data/labelled_shards.py) their classes, -1 past the last text:

    classes       c0 c1 c2 -1 ...                   (L,) int64: document d's class at column d
"""

from __future__ import annotations

import numpy as np

from scalelm.data.chat import ASSISTANT, LAST

TRAIN_ON = ("assistant", "all", "last")


def window_count(shard, seq_len: int, pairs: bool = False) -> int:
    """Windows of a shard (scalelm.data.shards.Shard): packed runs of conversations (or of preference pairs), or
    strides of seq_len."""
    if shard.lengths is None:
        return max(0, (shard.tokens - 1) // seq_len)
    return len(pack(shard.lengths, seq_len, pairs)) - 1


class TextWindows:
    """Window i of a text shard's token stream: tokens[i*L : i*L + L + 1] as input_ids and labels (the next
    tokens), with its documents' positions and ids when `eos_id` is given (data.document_mask)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int | None = None):
        n = max(0, (tokens.size - 1) // seq_len)
        # (n, L + 1) overlapping view: row i is tokens[i*L : i*L + L + 1]; no copy.
        self.rows = np.lib.stride_tricks.as_strided(tokens, (n, seq_len + 1), (seq_len * tokens.itemsize, tokens.itemsize),
                                                    writeable=False)
        self.seq_len, self.eos_id = seq_len, eos_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i].astype(np.int64)
        window = {"input_ids": row[:-1], "labels": row[1:]}
        return window if self.eos_id is None else {**window, **text_documents(window["input_ids"], self.eos_id)}

    def offset(self, i: int) -> int:
        return i * self.seq_len


class ChatWindows:
    """Window i of a chat shard: the i-th packed run of its conversations (`chat_window`)."""

    def __init__(self, tokens: np.ndarray, flags: np.ndarray, lengths: tuple[int, ...], seq_len: int, train_on: str,
                 pairs: bool = False, reference: np.ndarray | None = None, classes: tuple[int, ...] | None = None):
        self.tokens, self.flags, self.lengths = tokens, flags, np.asarray(lengths, np.int64)
        self.starts = pack(lengths, seq_len, pairs) if tokens.size else np.zeros(1, np.int64)  # a skipped bad shard is empty
        self.reference = reference  # (documents,) reference log-probs of a preference shard's sides, or None
        self.classes = None if classes is None else np.asarray(classes, np.int64)  # labelled texts' classes
        self.bounds = np.concatenate([[0], np.cumsum(self.lengths)])[self.starts]  # token offset of each window
        self.seq_len, self.train_on = seq_len, train_on

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> dict:
        a, b = self.bounds[i], self.bounds[i + 1]
        first, end = self.starts[i], self.starts[i + 1]
        window = chat_window(self.tokens[a:b], self.flags[a:b], self.lengths[first:end], self.seq_len, self.train_on)
        if self.reference is not None:
            window["reference"] = np.zeros(self.seq_len, np.float32)
            window["reference"][: end - first] = self.reference[first:end]
        if self.classes is not None:
            window["classes"] = np.full(self.seq_len, -1, np.int64)
            window["classes"][: end - first] = self.classes[first:end]
        return window

    def offset(self, i: int) -> int:
        return int(self.bounds[i])


def pack(lengths: tuple[int, ...], seq_len: int, pairs: bool = False) -> np.ndarray:
    """(windows + 1,) index of the first conversation of each window, and the number of conversations last.
    Next-fit in stored order; every length must be <= seq_len. With `pairs`, conversations 2k and 2k + 1 are
    one preference pair, packed as one (their lengths together must be <= seq_len)."""
    if pairs:
        lengths = np.asarray(lengths, np.int64)
        return 2 * pack(tuple(lengths[0::2] + lengths[1::2]), seq_len)
    starts, used = [0], 0
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            starts.append(i)
            used = 0
        used += n
    starts.append(len(lengths))
    return np.asarray(starts if lengths else [0], np.int64)


def chat_window(tokens: np.ndarray, flags: np.ndarray, lengths: np.ndarray, seq_len: int, train_on: str) -> dict:
    """The model's view of one window: `tokens` and `flags` of its conversations back to back, `lengths` theirs."""
    n = int(tokens.size)
    ids = np.zeros(seq_len, np.int64)
    ids[:n] = tokens
    document_ids, position_ids = document_positions(np.append(lengths, seq_len - n), seq_len)
    same = np.zeros(seq_len, bool)  # the next token belongs to the same conversation
    same[: n - 1] = document_ids[1:n] == document_ids[: n - 1]
    nxt = np.zeros(seq_len, np.uint8)
    nxt[: n - 1] = flags[1:n]
    target = same if train_on == "all" else same & ((nxt & (ASSISTANT if train_on == "assistant" else LAST)) > 0)
    labels = np.where(same, np.append(ids[1:], 0), 0)
    return {"input_ids": ids, "labels": labels, "loss_mask": target, "position_ids": position_ids,
            "document_ids": document_ids}


def text_documents(input_ids: np.ndarray, eos_id: int) -> dict:
    """position_ids and document_ids of a text window whose documents end at EOS (the token after an EOS
    starts the next document); the labels stay the stream's next tokens."""
    is_eos = input_ids == eos_id
    document_ids = np.concatenate([[0], np.cumsum(is_eos[:-1])]).astype(np.int64)
    starts = np.flatnonzero(np.diff(document_ids, prepend=-1))
    position_ids = np.arange(input_ids.size) - np.repeat(starts, np.diff(np.append(starts, input_ids.size)))
    return {"position_ids": position_ids, "document_ids": document_ids}


def document_positions(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """document_ids and position_ids of documents of these lengths laid end to end (a zero length is skipped)."""
    lengths = lengths[lengths > 0]
    document_ids = np.repeat(np.arange(lengths.size), lengths)
    position_ids = np.arange(seq_len) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return document_ids, position_ids
