import json

import pytest

from scalelm.data.files import sha256_file
from scalelm.data.tokenizer import CHAT_TOKENS, load_tokenizer, meta_path, train_tokenizer
from scalelm.errors import DataError


def test_special_tokens_and_meta(pipeline):
    sp = load_tokenizer(pipeline["tokenizer"])
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.vocab_size() == 400
    meta = json.loads(meta_path(pipeline["tokenizer"]).read_text())
    assert meta["sha256"] == sha256_file(pipeline["tokenizer"])
    assert meta["seed"] == 0 and len(meta["input_sha256"]) == 64
    for token in CHAT_TOKENS:  # each chat marker in text is one piece
        ids = sp.encode(f"hello {token} world")
        assert sp.piece_to_id(token) in ids and meta["special_ids"][token] == sp.piece_to_id(token)


def test_byte_fallback_round_trips_unseen_text(pipeline):
    sp = load_tokenizer(pipeline["tokenizer"])
    text = "Ünïcødé ✓ 漢字 and  two  spaces\tand a tab"
    ids = sp.encode(text)
    assert 0 not in ids  # nothing is <unk>
    assert sp.decode(ids) == text


def test_reproducible_on_any_number_of_threads(pipeline, tmp_path):
    meta = train_tokenizer([pipeline["docs"]], tmp_path / "again.model", vocab_size=400, workers=2)
    assert meta["sha256"] == sha256_file(pipeline["tokenizer"])  # that one was trained with workers=1
    other = train_tokenizer([pipeline["docs"]], tmp_path / "unigram.model", vocab_size=400, model_type="unigram", workers=1)
    assert other["sha256"] != meta["sha256"]


def test_errors(pipeline, tmp_path):
    with pytest.raises(DataError, match="must end in .model"):
        train_tokenizer([pipeline["docs"]], tmp_path / "t.bin", vocab_size=400)
    with pytest.raises(DataError, match=r"--vocab-size 100 is too small"):
        train_tokenizer([pipeline["docs"]], tmp_path / "t.model", vocab_size=100)
    with pytest.raises(DataError, match=r"need \d+ pieces: use --vocab-size \d+ or more"):
        train_tokenizer([pipeline["docs"]], tmp_path / "t.model", vocab_size=270)
    with pytest.raises(DataError, match=r"already exists .* pass --overwrite"):
        train_tokenizer([pipeline["docs"]], pipeline["tokenizer"], vocab_size=400)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="there is no text in"):
        train_tokenizer([tmp_path / "empty"], tmp_path / "t.model", vocab_size=400)
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "absent.model")
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "garbage.model")


def test_encoding_in_parts_is_identical(pipeline):
    from scalelm.data.readers import list_input_files, read_documents
    from scalelm.data.tokenizer import encode_documents, split_for_encoding

    sp = load_tokenizer(pipeline["tokenizer"])
    docs = list(read_documents(list_input_files([pipeline["docs"]])))[:50]
    docs.append("  leading spaces\n\n\nand\n  indented\nlines  \n" * 200)
    assert all(len(split_for_encoding(d, 64)) > 1 for d in docs)
    expected = [i for d in docs for i in [*sp.encode(d), sp.eos_id()]]
    assert encode_documents(sp, docs, size=64, eos=sp.eos_id()).tolist() == expected
    assert "".join(split_for_encoding(docs[-1], 64)) == docs[-1]


def test_lines_longer_than_sentencepiece_accepts_still_count(tmp_path):
    """A corpus of single-line documents far over sentencepiece's 16 KB line limit trains."""
    import json as _json
    import random

    from tests.helpers.corpus import make_words

    rng = random.Random(0)
    words = make_words(300)
    (tmp_path / "raw").mkdir()
    with open(tmp_path / "raw" / "long.jsonl", "w") as f:
        for _ in range(20):
            f.write(_json.dumps({"text": " ".join(rng.choice(words) for _ in range(6000))}) + "\n")
    meta = train_tokenizer([tmp_path / "raw"], tmp_path / "t.model", vocab_size=400, workers=1)
    sp = load_tokenizer(tmp_path / "t.model")
    assert meta["lines_read"] == 20 and len(sp.encode(" ".join(words[:50]))) < 200
