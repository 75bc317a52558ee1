"""The chat template, the one definition: conversations rendered to token ids for training, and the
Jinja template the exports carry (tokenizer_config.json, GGUF) for `apply_chat_template` and llama.cpp.

    <s><|system|>
    You are terse.<|end|>
    <|user|>
    Hi!<|end|>
    <|assistant|>
    Hello.<|end|>

Each turn is its role marker (one piece, scalelm.data.tokenizer.CHAT_TOKENS), a newline, the content,
<|end|> and a newline. `encode_conversation` produces exactly the ids `apply_chat_template` of the
exported tokenizer gives (tests/data/test_chat.py), and beside them a flag per token saying what it is
a target for: the content of an assistant turn and the <|end|> that closes it, so a finetuned model
learns to stop. The role markers and newlines around them are the prompt's, never targets.

NOTE: scalelm's tokenizers have no piece that holds "\n" (see data/tokenizer.py), so encoding a turn
part by part gives the ids of encoding the rendered text whole.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import sentencepiece as spm

from scalelm.data.tokenizer import CHAT_TOKENS

ROLES = ("system", "user", "assistant")
END_OF_TURN = CHAT_TOKENS[-1]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '" + END_OF_TURN + "\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TEMPLATE_SHA256 = hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()

# Flags per token of a chat shard (bits): what the token is a target for under finetune.train_on.
ASSISTANT = 1  # the content of an assistant turn, or the <|end|> closing it
LAST = 2  # ... of the conversation's last assistant turn


class ChatEncoder:
    """Renders conversations ([{role, content}, ...]) into (ids, flags) with one SentencePiece model."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        missing = [t for t in CHAT_TOKENS if sp.piece_to_id(t) == sp.unk_id()]
        if missing:
            raise ValueError(f"the tokenizer has no chat markers ({', '.join(missing)}): train it with "
                             f"`scalelm tokenizer train`, which adds them")
        self.sp = sp
        self.headers = {role: sp.encode(f"<|{role}|>\n") for role in ROLES}
        self.end = sp.piece_to_id(END_OF_TURN)
        self.newline = sp.encode("\n")

    def encode(self, messages: Sequence[dict], max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, flags) of a conversation, both (n,); ids start with BOS, as the template does.

        With `max_tokens`, a longer conversation is cut between turns: it keeps its first turns up to the
        last assistant turn that ends within max_tokens (which becomes its last), or is None when even the
        first assistant turn does not fit."""
        parts = self._parts(messages)
        keep = len(parts)
        if max_tokens is not None and 1 + sum(len(ids) for ids, _ in parts) > max_tokens:
            keep, n = 0, 1  # messages kept, tokens so far (BOS)
            for i, (ids, _) in enumerate(parts):
                n += len(ids)
                if n > max_tokens:
                    break
                if messages[i]["role"] == "assistant":
                    keep = i + 1
        if not any(m["role"] == "assistant" for m in messages[:keep]):
            return None
        last = max(i for i in range(keep) if messages[i]["role"] == "assistant")
        ids, flags = [self.sp.bos_id()], [0]
        for i, (part_ids, part_flags) in enumerate(parts[:keep]):
            ids += part_ids
            flags += [f | (LAST if i == last and f else 0) for f in part_flags]
        return np.asarray(ids, np.int64), np.asarray(flags, np.uint8)

    def encode_reply(self, prompt: Sequence[dict], reply: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, flags) of `prompt` followed by `reply` (one side of a preference pair): the ids of the whole
        conversation, and ASSISTANT | LAST on every token of the reply after its first assistant header, the
        newline closing it included (what follows `apply_chat_template(prompt, add_generation_prompt=True)`,
        as TRL counts a completion); nothing of the prompt, its own assistant turns included, is flagged."""
        ids = [self.sp.bos_id()] + [i for part, _ in self._parts(prompt) for i in part]
        start = len(ids) + len(self.headers["assistant"])
        ids += [i for part, _ in self._parts(reply) for i in part]
        flags = np.zeros(len(ids), np.uint8)
        flags[start:] = ASSISTANT | LAST
        return np.asarray(ids, np.int64), flags

    def prompt(self, messages: Sequence[dict]) -> list[int]:
        """The ids a model continues to answer `messages`: the conversation and the assistant's header (what
        `apply_chat_template(messages, add_generation_prompt=True)` gives)."""
        return [self.sp.bos_id()] + [i for part, _ in self._parts(messages) for i in part] + self.headers["assistant"]

    def _parts(self, messages: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
        """Per message: the ids of its header, content + <|end|> and newline, and their flags (ASSISTANT on an
        assistant's content and <|end|>)."""
        parts = []
        for message in messages:
            target = message["role"] == "assistant"
            header, body = self.headers[message["role"]], self.sp.encode(message["content"]) + [self.end]
            parts.append((header + body + self.newline,
                          [0] * len(header) + [ASSISTANT * target] * len(body) + [0] * len(self.newline)))
        return parts
