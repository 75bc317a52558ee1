"""Packed windows: conversations whole and apart in a window, their targets as train_on says; text
documents apart under document_mask; the chat loader reads every conversation once an epoch and resumes."""

import itertools
import json

import numpy as np
import pytest

from scalelm.data.chat import ASSISTANT, LAST
from scalelm.data.loader import TokenLoader
from scalelm.data.packing import chat_window, pack, text_documents
from scalelm.data.shards import read_manifest, read_shard_fields
from scalelm.errors import DataError

L = 128


def test_next_fit_packs_whole_conversations_in_order():
    starts = pack((50, 60, 30, 128, 1, 127), 128)
    assert starts.tolist() == [0, 2, 3, 4, 6]  # (50+60) (30) (128) (1+127): next-fit never reorders
    assert pack((), 128).tolist() == [0]


def test_a_window_keeps_conversations_apart():
    tokens = np.array([1, 10, 11, 12, 1, 20, 21])  # two conversations: 4 and 3 tokens
    flags = np.array([0, 0, ASSISTANT, ASSISTANT | LAST, 0, ASSISTANT | LAST, ASSISTANT | LAST], np.uint8)
    w = chat_window(tokens, flags, np.array([4, 3]), 10, "assistant")
    assert w["input_ids"].tolist() == [1, 10, 11, 12, 1, 20, 21, 0, 0, 0]
    assert w["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert w["document_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert w["labels"].tolist() == [10, 11, 12, 0, 20, 21, 0, 0, 0, 0]  # no label crosses a conversation
    assert w["loss_mask"].tolist() == [False, True, True, False, True, True, False, False, False, False]
    every = chat_window(tokens, flags, np.array([4, 3]), 10, "all")["loss_mask"]
    assert every.tolist() == [True, True, True, False, True, True, False, False, False, False]
    last = chat_window(tokens, np.where(flags & LAST, flags, 0).astype(np.uint8), np.array([4, 3]), 10, "last")["loss_mask"]
    assert last.tolist() == [False, False, True, False, True, True, False, False, False, False]


def test_text_documents_restart_after_each_eos():
    fields = text_documents(np.array([5, 6, 2, 7, 2, 2, 8]), eos_id=2)
    assert fields["document_ids"].tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert fields["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 0]


def chat_loader(chat, **kw):
    args = dict(split="train", seq_len=L, micro_batch_size=2, seed=3, tokenizer_sha256=None)
    return TokenLoader([chat["shards"]], **{**args, **kw})


def conversations(chat, split="train") -> set[bytes]:
    shards = read_manifest(chat["shards"], split)
    out = set()
    for shard in shards.shards:
        tokens = read_shard_fields(shard, {"tokens": shards.dtype})["tokens"].astype(np.int64)
        bounds = np.cumsum((0,) + shard.lengths)
        out |= {tokens[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:])}
    return out


def read_epoch(ld) -> list[bytes]:
    """Every conversation of the windows a loader hands out in its epoch 0."""
    seen = []
    for batch in ld:
        if ld.state_dict()["workers"][0]["streams"][0]["epoch"] > 0:
            return seen
        for row in range(batch["input_ids"].shape[0]):
            ids, docs = batch["input_ids"][row].numpy(), batch["document_ids"][row].numpy()
            real = batch["position_ids"][row].numpy()
            for d in np.unique(docs):
                piece = ids[docs == d]
                if real[docs == d][0] == 0 and piece[0] == 1:  # a conversation starts with BOS; padding does not
                    seen.append(piece.tobytes())


def test_every_conversation_once_an_epoch_over_ranks(chat):
    every = conversations(chat)
    seen = [c for rank in range(2) for c in read_epoch(chat_loader(chat, micro_batch_size=1, dp_rank=rank, dp_size=2))]
    assert len(seen) == len(set(seen))  # none twice
    assert set(seen) <= every and len(seen) >= 0.9 * len(every)  # all but the windows left over sit out


def test_batches_carry_the_packed_fields_and_resume_exactly(chat):
    ld = chat_loader(chat, num_workers=2)
    first = list(itertools.islice(ld, 3))
    assert set(first[0]) == {"input_ids", "labels", "loss_mask", "position_ids", "document_ids", "origin"}
    assert first[0]["loss_mask"].dtype.is_floating_point is False and first[0]["loss_mask"].any()
    state = json.loads(json.dumps(ld.state_dict()))
    expected = list(itertools.islice(ld, 3))
    again = chat_loader(chat, num_workers=2)
    again.load_state_dict(state)
    for a, b in zip(expected, itertools.islice(again, 3)):
        assert all(np.array_equal(a[k], b[k]) for k in a if k != "origin") and a["origin"] == b["origin"]


def test_a_run_too_short_for_the_shards_is_refused(chat):
    with pytest.raises(DataError, match=r"holds conversations of up to \d+ tokens, longer than train.seq_len=64: "
                                        r"re-shard with --seq-len 64"):
        chat_loader(chat, seq_len=64)


def test_shards_of_another_template_are_refused(chat, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(chat["shards"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["chat"]["template_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="made with another chat template"):
        TokenLoader([copy], split="train", seq_len=L, micro_batch_size=1)


def test_chat_and_text_shards_do_not_blend(chat, pipeline):
    with pytest.raises(DataError, match="chat shards and text shards cannot be blended"):
        TokenLoader([chat["shards"], pipeline["shards"]], split="train", seq_len=L, micro_batch_size=1)
