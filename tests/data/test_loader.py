import functools
import http.server
import itertools
import json
import shutil
import threading

import numpy as np
import pytest
import torch

from scalelm.config import load_config
from scalelm.data.loader import TokenLoader, loader_from_config
from scalelm.data.shards import read_manifest, read_shard, write_shards
from scalelm.errors import DataError
from tests.helpers.corpus import write_corpus

L = 32


def loader(shards, **kw) -> TokenLoader:
    args = dict(split="train", seq_len=L, micro_batch_size=2, seed=7)
    return TokenLoader([shards] if not isinstance(shards, list) else shards, **{**args, **kw})


def take(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    """n batches as (B, L + 1) token tensors."""
    return [torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1) for b in itertools.islice(loader, n)]


def all_windows(shards, split="train") -> list[bytes]:
    shard_set = read_manifest(shards, split)
    out = []
    for shard in shard_set.shards:
        tokens = read_shard(shard, shard_set.dtype).astype(np.int64)
        out += [tokens[i * L : i * L + L + 1].tobytes() for i in range((tokens.size - 1) // L)]
    return out


def epoch_windows(shards, consumer: int, consumers: int, split="train", **kw) -> list[bytes]:
    """The windows one consumer reads in epoch 0 (it moves to epoch 1 on the first window after)."""
    ld = loader(shards, split=split, micro_batch_size=1, dp_rank=consumer, dp_size=consumers, **kw)
    out = []
    for batch in ld:
        if ld.state_dict()["workers"][0]["streams"][0]["epoch"] > 0:
            return out
        out.append(torch.cat([batch["input_ids"][0], batch["labels"][0, -1:]]).numpy().tobytes())


def test_batches_are_packed_windows_with_shifted_labels(pipeline):
    ld = loader(pipeline["shards"], shuffle=False, micro_batch_size=4)
    batch = next(iter(ld))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, L)
    assert batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    batch["labels"][0, 0] = -100  # labels may be masked in place without touching the inputs
    assert batch["input_ids"][0, 1] != -100 and batch["input_ids"].is_contiguous()
    windows = all_windows(pipeline["shards"])
    first = take(loader(pipeline["shards"], shuffle=False, micro_batch_size=4), 1)[0]
    assert [w.numpy().tobytes() for w in first] == windows[:4]  # unshuffled: the stream in order
    # documents run on inside windows, separated by EOS (id 2)
    assert any(2 in np.frombuffer(w, dtype=np.int64)[1:-1] for w in windows)


@pytest.mark.parametrize("split, dp_size, workers, batch", [("train", 2, 2, 16), ("train", 3, 0, 1), ("val", 3, 0, 1)])
def test_an_epoch_reads_every_window_once_across_ranks_and_workers(pipeline, split, dp_size, workers, batch):
    """Shards of unequal size, and (val) fewer shards than readers: all readers move in lockstep, no
    window is read twice in an epoch, and only the remainder N mod R windows sit the epoch out."""
    expected = all_windows(pipeline["shards"], split)
    readers = dp_size * max(1, workers)
    per_reader = len(expected) // readers // batch * batch  # whole batches only
    seen = []
    for rank in range(dp_size):
        ld = loader(pipeline["shards"], split=split, micro_batch_size=batch, dp_rank=rank, dp_size=dp_size,
                    num_workers=workers)
        seen += [w.numpy().tobytes() for b in take(ld, per_reader // batch * max(1, workers)) for w in b]
        assert all(s["streams"][0]["epoch"] == 0 for s in ld.state_dict()["workers"])
    assert len(set(seen)) == len(seen) == readers * per_reader
    assert set(seen) <= set(expected)
    if batch == 1:
        assert len(expected) - len(seen) < readers


def test_ranks_and_workers_are_consumers(pipeline):
    """With W workers, batch k of rank r is batch k // W of consumer r * W + k % W."""
    for rank in (0, 1):
        with_workers = take(loader(pipeline["shards"], dp_rank=rank, dp_size=2, num_workers=2), 6)
        consumers = [take(loader(pipeline["shards"], dp_rank=rank * 2 + w, dp_size=4), 3) for w in (0, 1)]
        for k, batch in enumerate(with_workers):
            assert torch.equal(batch, consumers[k % 2][k // 2])


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("stop_after", [3, 4])
def test_resume_gives_exactly_the_next_batches(pipeline, rank, stop_after):
    """2 data-parallel ranks x 2 workers: interrupted after k batches, restored, batches k+1... match."""
    make = lambda: loader(pipeline["shards"], dp_rank=rank, dp_size=2, num_workers=2)  # noqa: E731
    straight = take(make(), 10)
    first = make()
    head = take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # survives a trip through a file
    second = make()
    second.load_state_dict(state)
    middle = take(second, 2)
    third = make()
    third.load_state_dict(second.state_dict())  # and a second interruption
    tail = take(third, 10 - stop_after - 2)
    assert len(head + middle + tail) == 10
    for a, b in zip(straight, head + middle + tail):
        assert torch.equal(a, b)


def test_iterating_again_continues(pipeline):
    straight = take(loader(pipeline["shards"], num_workers=2), 5)
    ld = loader(pipeline["shards"], num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(straight, take(ld, 2) + take(ld, 3)))


def test_deterministic_for_a_seed(pipeline):
    a, b = take(loader(pipeline["shards"]), 4), take(loader(pipeline["shards"]), 4)
    c = take(loader(pipeline["shards"], seed=8), 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_epochs_reshuffle(pipeline):
    e0 = epoch_windows(pipeline["shards"], 0, 1)
    ld = loader(pipeline["shards"], micro_batch_size=1)
    windows = [b.numpy().tobytes() for batch in take(ld, 2 * len(e0)) for b in batch]
    assert sorted(windows[len(e0):]) == sorted(e0) and windows[len(e0):] != e0


@pytest.fixture(scope="module")
def second_set(pipeline, tmp_path_factory):
    """Another shard set with the same tokenizer, for blending."""
    root = tmp_path_factory.mktemp("second")
    raw = write_corpus(root / "raw", n_docs=80, seed=99)
    write_shards([raw], pipeline["tokenizer"], root / "shards", shard_size=64 << 10, val_fraction=0.1,
                 workers=1, progress=False)
    return root / "shards"


def test_blending_follows_the_weights(pipeline, second_set):
    from_a = set(all_windows(pipeline["shards"]))
    ld = loader([pipeline["shards"], second_set], weights=[3, 1], micro_batch_size=8)
    windows = [w.numpy().tobytes() for batch in take(ld, 10) for w in batch]
    share = sum(w in from_a for w in windows) / len(windows)
    assert share == 0.75  # the deficit rule is exact on every prefix of 4
    default = loader([pipeline["shards"], second_set]).layout.weights
    tokens = [read_manifest(s, "train").tokens for s in (pipeline["shards"], second_set)]
    assert default == pytest.approx([t / sum(tokens) for t in tokens])


def test_blended_resume(pipeline, second_set):
    make = lambda: loader([pipeline["shards"], second_set], weights=[1, 1], num_workers=2)  # noqa: E731
    straight = take(make(), 7)
    first = make()
    take(first, 3)
    again = make()
    again.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], take(again, 4)))


def test_state_loads_whatever_the_spelling_of_the_path(pipeline):
    first = loader(str(pipeline["shards"]) + "/")
    take(first, 2)
    again = loader(pipeline["shards"])
    again.load_state_dict(first.state_dict())
    assert torch.equal(take(again, 1)[0], take(first, 1)[0])


def test_state_refuses_another_layout(pipeline):
    state = loader(pipeline["shards"], num_workers=2).state_dict()
    other = loader(pipeline["shards"], num_workers=1)
    with pytest.raises(DataError, match=r"another data layout \(num_workers 2 -> 1\)"):
        other.load_state_dict(state)


@pytest.fixture
def broken(pipeline, tmp_path):
    """A copy of the shard set whose second train shard we may damage."""
    shards = shutil.copytree(pipeline["shards"], tmp_path / "shards")
    return shards, shards / read_manifest(shards, "train").shards[1].url.rsplit("/", 1)[1]


def drain_epoch(shards):
    """Read a little more than one epoch, so every shard is opened."""
    return take(loader(shards, micro_batch_size=64), read_manifest(shards, "train").tokens // L // 64 + 2)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_bad_shard_is_named(broken, damage):
    shards, victim = broken
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 4096)
    with pytest.raises(DataError, match=f"{victim.name}: (truncated|corrupt).*data.on_bad_shard=skip"):
        drain_epoch(shards)


def test_bad_shard_in_a_worker_is_still_one_line(broken):
    shards, victim = broken
    victim.write_bytes(b"garbage")
    ld = loader(shards, micro_batch_size=64, num_workers=2)
    with pytest.raises(DataError) as info:
        take(ld, read_manifest(shards, "train").tokens // L // 64 + 2)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(victim))


def test_truncated_at_a_member_boundary_is_caught_by_the_token_count(broken):
    shards, victim = broken
    import tarfile

    with tarfile.open(victim) as tar:
        first_member_end = tar.getmembers()[1].offset  # cut after the first sample, on a header boundary
    victim.write_bytes(victim.read_bytes()[:first_member_end])
    with pytest.raises(DataError, match=f"{victim.name}: truncated"):
        drain_epoch(shards)


def test_bad_shard_can_be_skipped_and_counted(broken):
    shards, victim = broken
    everything = all_windows(shards)
    victim.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=f"skipping bad shard: .*{victim.name}"):
        seen = epoch_windows(shards, 0, 1, on_bad_shard="skip")
    missing = set(everything) - set(seen)
    assert 0 < len(missing) < len(everything) / 2  # only the victim's windows are missing
    assert len(seen) == len(set(seen))
    ld = loader(shards, on_bad_shard="skip", micro_batch_size=1)
    with pytest.warns(UserWarning):
        take(ld, len(seen) + 1)
    assert ld.state_dict()["workers"][0]["streams"][0]["bad_shards"] == [1]


def test_too_little_data_for_the_sequence_length(pipeline):
    with pytest.raises(DataError, match=r"holds 0 windows of train.seq_len \+ 1 = 10000001 tokens, fewer than its 1 readers"):
        loader(pipeline["shards"], split="val", seq_len=10**7)


def test_loader_from_config(pipeline):
    cfg = load_config(None, [f"data.train={pipeline['shards']}", f"data.tokenizer={pipeline['tokenizer']}",
                             f"train.seq_len={L}", "train.micro_batch_size=2", "data.num_workers=0"])
    train = loader_from_config(cfg, "train", dp_rank=1, dp_size=2)
    assert train.layout.shuffle and train.layout.dp_rank == 1 and next(iter(train))["input_ids"].shape == (2, L)
    val_a, val_b = loader_from_config(cfg, "val"), loader_from_config(cfg, "val")
    assert val_a.layout.split == "val" and not val_a.layout.shuffle
    assert all(torch.equal(a, b) for a, b in zip(take(val_a, 3), take(val_b, 3)))  # same batches every eval


def test_loader_refuses_shards_of_another_tokenizer(pipeline, tmp_path):
    other = tmp_path / "other.model"
    from scalelm.data.tokenizer import train_tokenizer

    train_tokenizer([pipeline["docs"]], other, vocab_size=420, workers=1)
    cfg = load_config(None, [f"data.train={pipeline['shards']}", f"data.tokenizer={other}"])
    with pytest.raises(DataError, match="made with another tokenizer"):
        loader_from_config(cfg)
    cfg.data.tokenizer = str(tmp_path / "missing.model")
    with pytest.raises(DataError, match="data.tokenizer=.*missing.model not found"):
        loader_from_config(cfg)


@pytest.fixture
def served(pipeline):
    """The shard set served over HTTP on loopback."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=pipeline["shards"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_shards_over_http_read_like_local_ones(pipeline, served):
    remote = take(loader(served, num_workers=2), 4)
    local = take(loader(pipeline["shards"], num_workers=2), 4)
    assert all(torch.equal(a, b) for a, b in zip(remote, local))
    with pytest.raises(DataError, match=r"/nothing/manifest.json: cannot be read: check the address"):
        read_manifest(served + "/nothing", "train")


def test_every_sequence_says_where_it_starts(pipeline):
    shard_set = read_manifest(pipeline["shards"], "train")
    tokens = {s.url: read_shard(s, shard_set.dtype).astype(np.int64) for s in shard_set.shards}
    for batch in itertools.islice(loader(pipeline["shards"], micro_batch_size=3), 5):
        assert len(batch["origin"]) == 3
        for row, origin in zip(batch["input_ids"], batch["origin"]):
            url, offset = origin.rsplit("@", 1)
            assert torch.equal(row, torch.from_numpy(tokens[url][int(offset) : int(offset) + L]))


def epoch_progress(ld: TokenLoader) -> list[tuple[int, float]]:
    """(epoch, share of its range read) of each of a loader's logical workers."""
    from scalelm.data.window_stream import WindowStream

    out = []
    for worker, state in enumerate(ld._states):
        reader = WindowStream(ld.sets[0], ld.layout.dp_rank * ld.layout.workers + worker,
                               ld.layout.dp_size * ld.layout.workers, ld.layout, "error", state["streams"][0])
        out.append((reader.epoch, reader.read_in_epoch() / reader.per_reader))
    return out


def test_another_data_parallel_size_continues_at_the_same_share_of_the_epoch(pipeline):
    one = loader(pipeline["shards"], micro_batch_size=50)
    seen = {w.numpy().tobytes() for w in torch.cat(take(one, 20))}
    (epoch, share), = epoch_progress(one)
    assert epoch == 0 and 0.1 < share < 0.9
    saved = [one.state_dict()]
    for rank in range(2):
        two = loader(pipeline["shards"], micro_batch_size=50, dp_rank=rank, dp_size=2, num_workers=2)
        assert "continues where the saved one was (epoch 0 at" in two.continue_from(saved)
        for got_epoch, got_share in epoch_progress(two):
            assert got_epoch == 0 and got_share == pytest.approx(share, abs=0.01)
        after = [w.numpy().tobytes() for w in torch.cat(take(two, 4))]
        assert len(set(after) & seen) < len(after)  # not the start of the epoch again
    other = loader(pipeline["shards"], micro_batch_size=50, seq_len=L // 2)
    assert "starts at the beginning" in other.continue_from(saved)
