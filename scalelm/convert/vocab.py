"""The tokenizer as the exports carry it: Hugging Face tokenizer files with the chat template, and
the SentencePiece vocabulary GGUF embeds. Both come from the one SentencePiece model the run used.

The chat template is scalelm.data.chat's, the one chat training renders conversations with.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from scalelm.data.chat import CHAT_TEMPLATE, END_OF_TURN
from scalelm.data.tokenizer import CHAT_TOKENS


@dataclass(frozen=True)
class Specials:
    """The ids of the tokenizer's special pieces (-1: it has none)."""

    bos: int
    eos: int
    unk: int
    pad: int
    end_of_turn: int


def specials(model_path: Path) -> Specials:
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    end = sp.piece_to_id(END_OF_TURN)
    return Specials(sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id(), end if end != sp.unk_id() else -1)


def write_hf_tokenizer(model_path: Path, out: Path, max_length: int) -> None:
    """tokenizer.model, tokenizer_config.json (LlamaTokenizer: SentencePiece, BOS added, no EOS) with the chat
    template, and special_tokens_map.json; `AutoTokenizer.from_pretrained(out)` loads them offline."""
    shutil.copyfile(model_path, out / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    piece = {name: sp.id_to_piece(i) for name, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()),
                                                     ("pad", sp.pad_id())) if i >= 0}
    chat = [t for t in CHAT_TOKENS if sp.piece_to_id(t) != sp.unk_id()]
    special = {f"{name}_token": text for name, text in piece.items()}
    # NOTE: without add_prefix_space matching the model, transformers' LlamaTokenizer prepends "▁" to every text
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
              "add_prefix_space": add_dummy_prefix(model_path),
              "additional_special_tokens": chat, "model_max_length": max_length, "legacy": False,
              "clean_up_tokenization_spaces": False}
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({**special, "additional_special_tokens": chat}, indent=2) + "\n")


def gguf_vocab(model_path: Path) -> tuple[list[bytes], list[float], list[int]]:
    """Every piece of the SentencePiece model with its score and type. SentencePiece's piece types
    (normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6) are GGUF's token types."""
    proto = _proto(model_path)
    return ([p.piece.encode("utf-8") for p in proto.pieces], [p.score for p in proto.pieces],
            [int(p.type) for p in proto.pieces])


def add_dummy_prefix(model_path: Path) -> bool:
    """Whether the SentencePiece model puts "▁" before a text (scalelm's do not)."""
    return _proto(model_path).normalizer_spec.add_dummy_prefix


def _proto(model_path: Path):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return proto
