"""Conversations in the forms users have them; every bad record is one line naming its file and line."""

import gzip
import json

import pytest
import zstandard

from scalelm.data.conversations import conversation_files, read_conversations
from scalelm.errors import DataError

QA = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
FORMS = {
    "messages": ({"messages": QA}, QA),
    "system field": ({"system": "S.", "messages": QA}, [{"role": "system", "content": "S."}, *QA]),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}, QA),
    "sharegpt under messages": ({"messages": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}, QA),
    "alpaca": ({"instruction": "Do.", "input": "This.", "output": "Done."},
               [{"role": "user", "content": "Do.\n\nThis."}, {"role": "assistant", "content": "Done."}]),
    "alpaca without input": ({"instruction": "Do.", "input": "", "output": "Done."},
                             [{"role": "user", "content": "Do."}, {"role": "assistant", "content": "Done."}]),
    "prompt/completion": ({"prompt": "Q?", "completion": "A."}, QA),
}


def write(path, records, opener=open):
    with opener(path, "wt") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.mark.parametrize("form", FORMS)
def test_every_form_reads_as_messages(tmp_path, form):
    record, messages = FORMS[form]
    path = write(tmp_path / "c.jsonl", [record])
    assert list(read_conversations([path])) == [(f"{path}:1", messages)]


def test_compressed_files_and_directories(tmp_path):
    write(tmp_path / "a.jsonl.gz", [FORMS["messages"][0]], gzip.open)
    with open(tmp_path / "b.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress((json.dumps(FORMS["alpaca"][0]) + "\n").encode()))
    (tmp_path / "notes.txt").write_text("not conversations")
    files = conversation_files([tmp_path])
    assert [f.name for f in files] == ["a.jsonl.gz", "b.jsonl.zst"]
    assert len(list(read_conversations(files))) == 2


@pytest.mark.parametrize("record, message", [
    ("{not json", r"c.jsonl:2: not valid JSON"),
    ({"messages": [{"role": "robot", "content": "x"}, *QA]}, r"c.jsonl:2: turn 1 has the role 'robot': use system, user, assistant"),
    ({"messages": [{"role": "user", "content": "  "}, QA[1]]}, r"c.jsonl:2: message 1 \(user\) is empty"),
    ({"messages": [QA[0]]}, r"c.jsonl:2: the conversation has no assistant turn"),
    ({"text": "a document"}, r"c.jsonl:2: not a conversation \(keys text\)"),
    ({"prompt": "Q?", "completion": 3}, r"c.jsonl:2: 'completion' is not text"),
])
def test_a_bad_record_names_its_file_and_line(tmp_path, record, message):
    path = write(tmp_path / "c.jsonl", [FORMS["messages"][0], record])
    with pytest.raises(DataError, match=message):
        list(read_conversations([path]))
