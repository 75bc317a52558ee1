"""The GGUF exports in llama.cpp itself: it loads them, tokenizes like SentencePiece and computes scalelm's
logits. Opt-in (pytest --llamacpp): llama-cpp-python has no wheel and compiles for 10+ minutes."""

import numpy as np
import pytest
import sentencepiece as spm

from scalelm.cli import main
from scalelm.convert.parity import probe_tokens, scalelm_logits
from scalelm.convert.source import read_model

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow, pytest.mark.xdist_group("convert")]


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("dtype, target", [("f32", 1e-3), ("f16", 1e-2), ("q8_0", 0.1)])
def test_llama_cpp_computes_what_scalelm_computes(name, dtype, target, trained, pipeline, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / f"{name}.gguf"
    assert main(["convert", "to-gguf", str(trained[name]), str(out), "--dtype", dtype, "--no-verify"]) == 0
    model = read_model(trained[name])
    tokens = probe_tokens(model.model.vocab_size, model.model.max_position_embeddings)[0]
    ours = scalelm_logits(model.model, model.weights, tokens[None])[0].numpy()

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=len(tokens), logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens.tolist())
    theirs = np.array(llm.scores[: len(tokens)])
    assert np.abs(theirs - ours).max() <= target
    sp = spm.SentencePieceProcessor(model_file=str(pipeline["tokenizer"]))
    text = "The river runs   far.\nNew line! <|user|>"
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == [sp.bos_id()] + sp.encode(text)
