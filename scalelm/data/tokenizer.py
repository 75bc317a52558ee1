"""`scalelm tokenizer train`: a SentencePiece model with byte fallback and scalelm's special tokens.

Ids 0-3 are fixed (<unk>, <s>, </s>, <pad>), the chat-role markers follow as user-defined
symbols (so the text "<|user|>" encodes to one id), and every byte has a piece, so no text is
ever unknown. Beside PATH.model, PATH.json records the seed, the settings and the SHA-256 of the
input and of the model: the model's hash is the tokenizer's identity that shards are checked against.

NOTE: the model is trained on lines and without SentencePiece's dummy prefix (like GPT-2 and
Llama 3, a text's first word gets no leading "▁"). Together these mean no piece contains "\n",
so a document's ids are exactly the concatenation of the ids of its parts cut after newlines.
`encode_document` uses that: SentencePiece's BPE slows down on very long inputs (0.6M tokens/s
on whole books here, 1.2M on 2K-character parts), and the parts give identical ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import sentencepiece as spm

from scalelm.data.files import make_dir, sha256_file
from scalelm.data.readers import list_input_files, read_documents
from scalelm.data.workers import default_workers
from scalelm.errors import ConfigError, DataError

SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MAX_SENTENCE_BYTES = 1 << 14
MIN_VOCAB = len(SPECIAL_IDS) + len(CHAT_TOKENS) + 256 + 1  # specials, chat markers, bytes, one more


def meta_path(model_path: str | Path) -> Path:
    """PATH.json beside PATH.model."""
    return Path(model_path).with_suffix(".json")


def train_tokenizer(inputs: Sequence[str | Path], out: str | Path, vocab_size: int, *, model_type: str = "bpe",
                    seed: int = 0, max_sentences: int = 2_000_000, character_coverage: float = 0.9999,
                    workers: int | None = None, overwrite: bool = False) -> dict:
    """Train on the lines of the documents in `inputs`; writes OUT (.model) and OUT's .json; returns the meta."""
    out = Path(out)
    if out.suffix != ".model":
        raise DataError(f"--out {out}: a SentencePiece model path must end in .model")
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists (shards may have been made with it): choose another --out or pass --overwrite")
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback and the special tokens alone take "
                        f"{MIN_VOCAB - 1} pieces; use a few thousand or more")
    files = list_input_files(inputs)
    if not files:
        raise DataError(f"no readable files in {', '.join(map(str, inputs))}: run `scalelm prepare` first")
    input_hash = hashlib.sha256()
    counted = {"lines": 0}

    def sentences() -> Iterator[str]:
        for doc in read_documents(files):
            input_hash.update(doc.encode())
            input_hash.update(b"\0")
            for line in doc.split("\n"):
                if line.strip():
                    counted["lines"] += 1
                    yield from _fit(line)

    model = io.BytesIO()
    # NOTE: sentencepiece samples input_sentence_size lines with its own RNG; seeding it makes the
    # model a function of (input, settings, seed) alone.
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=character_coverage, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            add_dummy_prefix=False,
            max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=max_sentences, shuffle_input_sentence=True,
            unk_id=SPECIAL_IDS["unk"], bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"], pad_id=SPECIAL_IDS["pad"],
            user_defined_symbols=list(CHAT_TOKENS), num_threads=workers or default_workers(),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"sentencepiece could not train a {vocab_size}-piece model: {_explain(str(e), inputs)}") from None
    make_dir(out.parent)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(_without_thread_count(model.getvalue()))
    tmp.rename(out)
    sp = load_tokenizer(out)
    meta = {
        "sha256": sha256_file(out),
        "vocab_size": vocab_size,
        "model_type": model_type,
        "seed": seed,
        "input_sha256": input_hash.hexdigest(),
        "inputs": [str(p) for p in inputs],
        "lines_read": counted["lines"],
        "special_ids": {**SPECIAL_IDS, **{t: sp.piece_to_id(t) for t in CHAT_TOKENS}},
        "sentencepiece_version": spm.__version__,
    }
    meta_path(out).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _fit(line: str) -> Iterator[str]:
    """`line` in pieces sentencepiece accepts (it skips lines over MAX_SENTENCE_BYTES), cut before spaces.

    Pieces never span a space, so cutting there changes no statistic the trainer counts."""
    step = MAX_SENTENCE_BYTES // 4  # characters: at most 4 UTF-8 bytes each
    start = 0
    while len(line) - start > step:
        cut = line.rfind(" ", start + 1, start + step)
        cut = cut if cut > start else start + step
        yield line[start:cut]
        start = cut
    yield line[start:]


def _without_thread_count(model: bytes) -> bytes:
    """The model with the trainer's thread count zeroed: the same pieces and scores must hash the same
    whatever machine trained them."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.trainer_spec.num_threads = 0
    return proto.SerializeToString(deterministic=True)


def resolve_vocab_size(cfg) -> int:
    """The run's vocabulary: data.tokenizer's, or model.vocab_size; they must agree when both are given."""
    if cfg.data.tokenizer is None:
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size is null and there is no data.tokenizer to take it from: set one")
        return cfg.model.vocab_size
    size = load_tokenizer(Path(cfg.data.tokenizer)).vocab_size()
    if cfg.model.vocab_size not in (None, size):
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but data.tokenizer has {size} pieces: "
                          f"set model.vocab_size={size} or null")
    return size


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model, with a one-line error for a missing or broken file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}: train one with `scalelm tokenizer train`")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise DataError(f"{path}: not a SentencePiece model ({' '.join(str(e).split())})") from None


def split_for_encoding(text: str, size: int = 2048) -> list[str]:
    """`text` cut after the first newline past every `size` characters; see the module NOTE."""
    parts, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + size)
        end = len(text) if cut < 0 else cut + 1
        parts.append(text[start:end])
        start = end
    return parts


def encode_documents(sp: spm.SentencePieceProcessor, texts: list[str], size: int = 2048,
                     eos: int | None = None, dtype: np.dtype = np.int64) -> np.ndarray:
    """All texts' ids back to back, each text followed by `eos` if given; each text's ids are exactly
    `sp.encode(text)`, computed part by part (single-threaded)."""
    parts = [split_for_encoding(t, size) for t in texts]
    ids = iter(sp.encode([p for ps in parts for p in ps], num_threads=1))
    tail = [] if eos is None else [[eos]]
    pieces = [np.asarray(x, dtype) for ps in parts for x in [*(next(ids) for _ in ps), *tail]]
    return np.concatenate(pieces) if pieces else np.empty(0, dtype)


def _explain(message: str, inputs: Sequence[str | Path]) -> str:
    message = " ".join(message.split())
    if "sentences_.empty()" in message:
        return f"there is no text in {', '.join(map(str, inputs))}"
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
        return (f"byte fallback and the corpus's characters need {m.group(2)} pieces: "
                f"use --vocab-size {m.group(2)} or more")
    if m := re.search(r"<= (\d+)", message):
        return f"the corpus supports at most {m.group(1)} pieces: lower --vocab-size or add text"
    return message
