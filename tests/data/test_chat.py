"""The chat template: training ids equal the exported tokenizer's apply_chat_template, and the targets
are the assistant turns with the <|end|> that closes each."""

import numpy as np
import pytest

from scalelm.convert.vocab import write_hf_tokenizer
from scalelm.data.chat import ASSISTANT, LAST, ChatEncoder
from scalelm.data.tokenizer import load_tokenizer

CONVERSATIONS = {
    "one exchange": [{"role": "user", "content": "Kalo mi ren?"}, {"role": "assistant", "content": "Ta vo shi."}],
    "multi-turn with a system prompt": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Pel dar nu,\ness tor?"},
        {"role": "assistant", "content": "Bri an qu.\n\n  Indented, and 42 digits."},
        {"role": "user", "content": "Zo ry wen!"},
        {"role": "assistant", "content": "Fa el ka — lo ümlaut ✓."}],
}


@pytest.fixture(scope="module")
def encoder(pipeline):
    return ChatEncoder(load_tokenizer(pipeline["tokenizer"]))


@pytest.fixture(scope="module")
def hf_tokenizer(pipeline, tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("hf-tokenizer")
    write_hf_tokenizer(pipeline["tokenizer"], out, 128)
    return AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_training_ids_equal_apply_chat_template(encoder, hf_tokenizer, name):
    ids, _ = encoder.encode(CONVERSATIONS[name])
    theirs = hf_tokenizer.apply_chat_template(CONVERSATIONS[name], tokenize=True, return_dict=True)["input_ids"]
    assert ids.tolist() == list(theirs)


def test_targets_are_assistant_turns_and_their_end_of_turn(encoder):
    messages = CONVERSATIONS["multi-turn with a system prompt"]
    ids, flags = encoder.encode(messages)
    sp, end = encoder.sp, encoder.end
    assert flags[0] == 0 and ids[0] == sp.bos_id()
    targets = ids[(flags & ASSISTANT) > 0]
    expected = [t for m in messages if m["role"] == "assistant" for t in sp.encode(m["content"]) + [end]]
    assert targets.tolist() == expected  # the replies and the <|end|> after each: the model learns to stop
    last = ids[(flags & LAST) > 0]
    assert last.tolist() == sp.encode(messages[-1]["content"]) + [end]
    assert sp.piece_to_id("<|assistant|>") not in targets  # the prompt's markers are never targets
    assert np.count_nonzero(ids == end) == len(messages)  # every turn closes with <|end|>, targets or not


def test_a_long_conversation_is_cut_between_turns(encoder):
    messages = CONVERSATIONS["multi-turn with a system prompt"]
    whole, _ = encoder.encode(messages)
    first, _ = encoder.encode(messages[:3])
    ids, flags = encoder.encode(messages, max_tokens=len(whole) - 1)
    assert ids.tolist() == first.tolist()  # up to the end of the first assistant turn
    assert np.array_equal((flags & LAST) > 0, (flags & ASSISTANT) > 0)  # which is now the last one
    assert encoder.encode(messages, max_tokens=len(first) - 1) is None  # not even that fits
