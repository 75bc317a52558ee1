"""`scalelm shard --prompts` and PromptSet: prompts for RL into shards and back, in a resumable shuffled order."""

import gzip
import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from scalelm.data.chat import TEMPLATE_SHA256, ChatEncoder
from scalelm.data.loader import TokenLoader
from scalelm.data.prompt_shards import write_prompt_shards
from scalelm.data.prompts import PromptSet
from scalelm.data.shards import read_manifest
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import DataError
from tests.helpers.corpus import make_sentence, make_words


def prompt_records(n: int, seed: int = 0) -> list[dict]:
    """n prompts in every form `scalelm shard --prompts` reads, some with an answer and metadata."""
    rng, words = random.Random(seed), make_words(200, seed + 1)
    records = []
    for i in range(n):
        question = make_sentence(rng, words)
        record = [{"prompt": question},
                  {"messages": [{"role": "user", "content": question}]},
                  {"messages": [{"role": "system", "content": make_sentence(rng, words)},
                                {"role": "user", "content": question}, {"role": "assistant", "content": "No."},
                                {"role": "user", "content": make_sentence(rng, words)}]},
                  {"conversations": [{"from": "human", "value": question}], "system": "Be brief."},
                  {"prompt": [{"role": "user", "content": question}]}][i % 5]
        if i % 3:
            record["answer"] = i if i % 2 else f"answer {i}"
        if i % 4 == 0:
            record["metadata"] = {"index": i, "tags": ["a", "b"]}
        records.append(record)
    return records


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def prompts(pipeline, tmp_path_factory):
    """40 prompts, their shards (val 0.25) and the tokenizer."""
    root = tmp_path_factory.mktemp("prompts")
    records = prompt_records(40)
    raw = write_jsonl(root / "prompts.jsonl", records)
    manifest = write_prompt_shards([raw], pipeline["tokenizer"], root / "shards", val_fraction=0.25, progress=False)
    return {"records": records, "raw": raw, "shards": root / "shards", "manifest": manifest,
            "tokenizer": pipeline["tokenizer"]}


def expected_messages(record: dict) -> list[dict]:
    turns = record.get("messages", record.get("conversations", record.get("prompt")))
    messages = [{"role": {"human": "user"}.get(t.get("role", t.get("from")), t.get("role", t.get("from"))),
                 "content": t.get("content", t.get("value"))} for t in turns]
    return ([{"role": "system", "content": record["system"]}] if "system" in record else []) + messages


def test_ids_answers_and_metadata_are_stored(prompts):
    sp = load_tokenizer(prompts["tokenizer"])
    encoder = ChatEncoder(sp)
    m = prompts["manifest"]
    assert m["kind"] == "prompts" and m["chat"] == {"prompts": True, "template_sha256": TEMPLATE_SHA256, "seq_len": None}
    seen = 0
    for split in ("train", "val"):
        assert read_manifest(prompts["shards"], split).kind == "prompts"
        s = PromptSet([prompts["shards"]], split, shuffle=False)
        assert len(s) == m["splits"][split]["prompts"] and s.longest == m["splits"][split]["longest"]
        assert sum(s[i].answer is not None for i in range(len(s))) == m["splits"][split]["with_answer"]
        for _, p in s.take(len(s)):
            record = next(r for r in prompts["records"] if p.chat == (not isinstance(r.get("prompt"), str))
                          and p.prompt == (expected_messages(r) if p.chat else r["prompt"]))
            ids = encoder.prompt(expected_messages(record)) if p.chat else [sp.bos_id(), *sp.encode(record["prompt"])]
            assert p.ids == tuple(ids)
            assert p.answer == (None if "answer" not in record else str(record["answer"]))
            assert p.metadata == record.get("metadata", {})
            seen += 1
    assert seen == 40 and 0 < m["splits"]["val"]["prompts"] < 40


def test_the_val_split_does_not_depend_on_order(prompts, tmp_path):
    records = [dict(reversed(list(r.items()))) for r in prompts["records"]][::-1]  # other line and key order
    write_jsonl(tmp_path / "in" / "again.jsonl.gz", records)
    write_prompt_shards([tmp_path / "in"], prompts["tokenizer"], tmp_path / "out", val_fraction=0.25, progress=False)
    again, first = PromptSet([tmp_path / "out"], "val"), PromptSet([prompts["shards"]], "val")
    assert sorted(again[i].ids for i in range(len(again))) == sorted(first[i].ids for i in range(len(first)))


def test_take_goes_on_into_the_next_epoch(prompts):
    s = PromptSet([prompts["shards"]], "train", seed=3)
    n = len(s)
    first = [i for i, _ in s.take(n - 2)]
    crossing = [i for i, _ in s.take(5)]
    assert s.state_dict() == {"epoch": 1, "position": 3, "prompts": n}
    epoch0 = first + crossing[:2]
    epoch1 = crossing[2:] + [i for i, _ in s.take(n - 3)]
    assert epoch0 == np.random.default_rng([3, 0]).permutation(n).tolist()
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    assert s.state_dict() == {"epoch": 2, "position": 0, "prompts": n}


def test_a_resumed_set_hands_out_the_same_prompts(prompts):
    straight = PromptSet([prompts["shards"]], "train", seed=7)
    expected = straight.take(50)
    first = PromptSet([prompts["shards"]], "train", seed=7)
    head = first.take(23)
    resumed = PromptSet([prompts["shards"]], "train", seed=7)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + resumed.take(27) == expected


def test_val_keeps_its_stored_order(prompts):
    s = PromptSet([prompts["shards"], prompts["shards"]], "val", shuffle=False)  # two sources: concatenated
    n = len(s) // 2
    order = [i for i, _ in s.take(4 * n)]
    assert order == list(range(2 * n)) * 2 and s[0] == s[n]


def test_a_state_of_another_set_is_refused(prompts):
    s = PromptSet([prompts["shards"]], "train")
    with pytest.raises(DataError, match=f"a prompt state of 3 prompts .* these sources hold {len(s)}"):
        s.load_state_dict({"epoch": 0, "position": 1, "prompts": 3})


@pytest.mark.parametrize("record, message", [
    ({"answer": "4"}, "the prompt is missing (keys answer)"),
    ({"prompt": "  "}, "the prompt is empty"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "the prompt ends with an assistant turn"),
    ({"messages": [{"role": "narrator", "content": "Hi"}]}, "turn 1 has the role 'narrator'"),
    ({"prompt": "Hi", "metadata": ["a"]}, "'metadata' is a list: give a JSON object"),
    ({"prompt": "Hi", "answer": [1]}, "'answer' is a list: give a string or a number"),
])
def test_a_bad_record_names_its_line(pipeline, tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, record])
    with pytest.raises(DataError, match=re.escape(message)) as e:
        write_prompt_shards([path], pipeline["tokenizer"], tmp_path / "out", progress=False)
    assert str(e.value).startswith(f"{path}:2: ") and "\n" not in str(e.value)


def test_a_chat_prompt_needs_the_chat_markers(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(make_sentence(random.Random(i), make_words(50)) for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "plain"), vocab_size=60,
                                   minloglevel=2, num_threads=1)
    raw = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Ka lo."}, {"messages": [{"role": "user", "content": "Ka?"}]}])
    with pytest.raises(DataError, match=r":2: a chat prompt, and the tokenizer has no chat markers"):
        write_prompt_shards([raw], tmp_path / "plain.model", tmp_path / "out", progress=False)


def test_shards_of_another_tokenizer_or_kind_are_refused(prompts, pipeline):
    with pytest.raises(DataError, match="was made with another tokenizer"):
        PromptSet([prompts["shards"]], "train", tokenizer_sha256="0" * 64)
    with pytest.raises(DataError, match="holds text shards, not prompts: write prompts with `scalelm shard --prompts`"):
        PromptSet([pipeline["shards"]], "train")
    with pytest.raises(DataError, match="holds prompts .* not windows of tokens"):
        TokenLoader([prompts["shards"]], split="train", seq_len=64, micro_batch_size=1)


def test_a_corrupt_shard_is_one_line(prompts, tmp_path):
    import shutil

    copy = shutil.copytree(prompts["shards"], tmp_path / "copy")
    victim = copy / "train-000000.tar"
    data = bytearray(victim.read_bytes())
    data[512 + 10] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000000.tar: sha256 differs from the manifest") as e:
        PromptSet([copy], "train")
    assert "\n" not in str(e.value)


def test_the_command_writes_and_inspects_prompts(prompts, tmp_path):
    cli = [sys.executable, "-m", "scalelm", "shard", "--prompts", str(prompts["raw"]), "--tokenizer",
           str(prompts["tokenizer"]), "--out", str(tmp_path / "out"), "--val-fraction", "0.25"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    train = prompts["manifest"]["splits"]["train"]
    assert (f"train: {train['prompts']} prompts ({train['with_answer']} with answers), the longest {train['longest']} "
            f"tokens;") in done.stdout and f"-> {tmp_path / 'out'}/" in done.stdout
    inspect = subprocess.run([sys.executable, "-m", "scalelm", "inspect", str(tmp_path / "out"), "--verify"],
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    assert f"({train['prompts']} prompts, {train['with_answer']} with answers" in inspect.stdout
    assert "all 2 shards verified" in inspect.stdout
    with open(prompts["raw"]) as f:
        lines = f.read()
    bad = write_jsonl(tmp_path / "bad" / "p.jsonl", [])
    bad.write_text(lines + '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n')
    refused = subprocess.run(cli[:5] + [str(bad)] + cli[6:] + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == f"scalelm: error: {bad}:41: the prompt ends with an assistant " \
                                                      f"turn, which the model is to write: end it with a user (or system) turn"
