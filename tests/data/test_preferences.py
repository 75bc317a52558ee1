"""Preference pairs: the forms `scalelm shard --preference` reads, the shards it writes, and what it drops."""

import json
import subprocess
import sys

import numpy as np
import pytest

from scalelm.data.chat import ASSISTANT, LAST, ChatEncoder
from scalelm.data.preference_shards import write_preference_shards
from scalelm.data.preferences import read_pairs, to_pair
from scalelm.data.shards import read_manifest, read_shard_fields
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import DataError
from tests.helpers.corpus import write_pairs

PROMPT, CHOSEN, REJECTED = "Who speaks first?", "The ghost, my lord.", "My lord, the ghost."
EXPECTED = ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
            [{"role": "assistant", "content": CHOSEN}], [{"role": "assistant", "content": REJECTED}])


@pytest.mark.parametrize("record", [
    {"system": "Be brief.", "prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    {"system": "Be brief.", "prompt": [{"role": "user", "content": PROMPT}],
     "chosen": [{"role": "assistant", "content": CHOSEN}], "rejected": [{"from": "gpt", "value": REJECTED}]},
    {side: [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": reply}] for side, reply in (("chosen", CHOSEN), ("rejected", REJECTED))},
], ids=["strings", "messages", "whole-conversations"])
def test_every_form_reads_as_the_same_pair(record):
    assert to_pair(record, "f:1") == EXPECTED


@pytest.mark.parametrize("record, message", [
    ({"prompt": "hi", "chosen": "a"}, "not a preference pair"),
    ({"prompt": "hi", "chosen": 3, "rejected": "b"}, "'chosen' is neither text"),
    ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "does not end with an assistant"),
    ({"prompt": [{"role": "narrator", "content": "x"}], "chosen": "a", "rejected": "b"}, "has the role 'narrator'"),
    ({"chosen": "a", "rejected": "b"}, "no 'prompt', and chosen is not a list"),
    ({side: [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": u},
             {"role": "assistant", "content": "b"}] for side, u in (("chosen", "x"), ("rejected", "y"))},
     "the chosen reply does not start with an assistant turn"),
])
def test_a_record_that_is_no_pair_is_an_error_naming_file_and_line(record, message):
    with pytest.raises(DataError, match=message) as e:
        to_pair(record, "pairs.jsonl:7")
    assert str(e.value).startswith("pairs.jsonl:7: ")


def test_empty_and_identical_replies_are_flagged_not_errors(tmp_path):
    path = write_pairs(tmp_path, n=3, empty=2, identical=1)
    read = list(read_pairs([path]))
    assert [why for _, _, why in read] == [None, None, None, "empty", "empty", "identical"]
    assert all(pair is None for _, pair, why in read if why)


@pytest.fixture(scope="module")
def shards(pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    raw = write_pairs(root / "raw", n=90, empty=4, identical=3)
    manifest = write_preference_shards([raw], pipeline["tokenizer"], root / "shards", seq_len=512, val_fraction=0.2,
                                       shard_size=64 << 10, workers=1, progress=False)
    return {"raw": raw, "out": root / "shards", "manifest": manifest, "tokenizer": pipeline["tokenizer"]}


def test_each_pair_is_its_chosen_then_its_rejected_side_with_the_replies_as_targets(shards):
    encoder = ChatEncoder(load_tokenizer(shards["tokenizer"]))
    expected = {}
    for _, pair, _ in read_pairs([shards["raw"]]):
        if pair is not None:
            sides = [encoder.encode_reply(pair[0], reply) for reply in pair[1:]]
            expected[tuple(sides[0][0])] = sides
    seen = 0
    for split in ("train", "val"):
        s = read_manifest(shards["out"], split)
        assert s.pairs and s.chat["pairs"]
        for shard in s.shards:
            fields = read_shard_fields(shard, {"tokens": s.dtype, "flags": np.dtype(np.uint8)})
            starts = np.cumsum((0,) + shard.lengths)
            for k in range(0, len(shard.lengths), 2):
                (c_ids, c_flags), (r_ids, r_flags) = expected[tuple(int(t) for t in fields["tokens"][starts[k]:starts[k + 1]])]
                assert np.array_equal(fields["tokens"][starts[k + 1]:starts[k + 2]], r_ids)
                assert np.array_equal(fields["flags"][starts[k]:starts[k + 1]], c_flags)
                assert np.array_equal(fields["flags"][starts[k + 1]:starts[k + 2]], r_flags)
                seen += 1
    assert seen == len(expected) == 90 and shards["manifest"]["splits"]["train"]["dropped_overlong"] == 0
    # the prompt (system and user turns, and the assistant header) is no target; the reply's tokens are, up to
    # the newline after its <|end|>: what follows the generation prompt, as TRL counts a completion
    ids, flags = next(iter(expected.values()))[0]
    first = int(np.argmax(flags > 0))
    assert first > 3 and (flags[first:] == ASSISTANT | LAST).all()
    assert list(ids[first - len(encoder.headers["assistant"]):first]) == encoder.headers["assistant"]
    assert list(ids[-1 - len(encoder.newline):]) == [encoder.end] + encoder.newline


def test_what_is_dropped_is_counted(shards, pipeline, tmp_path):
    splits = shards["manifest"]["splits"]
    assert splits["train"]["dropped_empty"] == 4 and splits["train"]["dropped_identical"] == 3
    assert splits["train"]["pairs"] + splits["val"]["pairs"] == 90 and splits["val"]["pairs"] > 0
    long = write_preference_shards([shards["raw"]], pipeline["tokenizer"], tmp_path / "short", seq_len=100,
                                   val_fraction=0.0, workers=1, progress=False)["splits"]["train"]
    assert long["dropped_overlong"] > 0 and long["pairs"] + long["dropped_overlong"] == 90
    assert max(a + b for s in long["shards"] for a, b in zip(s["lengths"][0::2], s["lengths"][1::2])) <= 100


def test_sharding_again_drops_the_reference_log_probs_of_the_shards_it_replaces(shards, pipeline, tmp_path):
    out = tmp_path / "shards"
    write_preference_shards([shards["raw"]], pipeline["tokenizer"], out, workers=1, progress=False)
    (out / "reference" / "0123456789abcdef").mkdir(parents=True)  # as `scalelm score` leaves them
    with pytest.raises(DataError, match="already holds shards"):
        write_preference_shards([shards["raw"]], pipeline["tokenizer"], out, workers=1, progress=False)
    assert (out / "reference").is_dir()  # refused: nothing touched
    write_preference_shards([shards["raw"]], pipeline["tokenizer"], out, workers=1, progress=False, overwrite=True)
    assert not (out / "reference").exists()


def test_a_run_shorter_than_its_pairs_is_refused(shards):
    from scalelm.data.loader import TokenLoader

    longest = max(a + b for s in shards["manifest"]["splits"]["train"]["shards"]
                  for a, b in zip(s["lengths"][0::2], s["lengths"][1::2]))
    with pytest.raises(DataError, match=f"holds preference pairs of up to {longest} tokens, longer than train.seq_len=64"):
        TokenLoader([shards["out"]], split="train", seq_len=64, micro_batch_size=1)


def test_the_command_reports_and_refuses_when_nothing_is_left(pipeline, tmp_path):
    raw = write_pairs(tmp_path / "raw", n=12, empty=1)
    run = [sys.executable, "-m", "scalelm", "shard", str(raw), "--preference", "--tokenizer", str(pipeline["tokenizer"]),
           "--seq-len", "512", "--workers", "1"]
    done = subprocess.run(run + ["--out", str(tmp_path / "ok")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kept = [int(line.split(": ")[1].split(" pairs")[0]) for line in done.stdout.splitlines() if " pairs, " in line]
    assert sum(kept) == 12 and "dropped 1 with an empty reply" in done.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    done = subprocess.run(run[:4] + [str(bad)] + run[5:] + ["--out", str(tmp_path / "none")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"scalelm: error: no preference pair in {bad} can be trained on: 0 have an empty reply, 1 two identical ones "
        f"and 0 are longer than --seq-len 512 (both sides together)")
