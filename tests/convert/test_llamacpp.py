"""The GGUF exports in llama.cpp itself: it loads them, tokenizes like SentencePiece and computes scalelm's
logits, a GGUF LoRA adapter applied (--lora) included. Opt-in (pytest --llamacpp): llama-cpp-python has no
wheel and compiles for 10+ minutes."""

import numpy as np
import pytest
import sentencepiece as spm

from scalelm.cli import main
from scalelm.convert.gguf_lora import to_gguf_lora
from scalelm.convert.parity import probe_tokens, scalelm_logits
from scalelm.convert.source import read_model
from tests.helpers.lora_checkpoints import ALL, lora_checkpoint

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


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("dtype, target", [("f32", 1e-3), ("f16", 1e-2)])
def test_llama_cpp_applies_a_gguf_lora_adapter_as_merged(name, dtype, target, trained, tmp_path):
    """The base's GGUF with the adapter's GGUF (--lora) computes what the merged model's GGUF computes, and what
    scalelm computes with the adapters merged in; rsLoRA for Llama, so its alpha is written as alpha sqrt(r)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt = lora_checkpoint(trained[name], tmp_path / "lora", ALL, rslora=name == "llama")
    base, merged, adapter = tmp_path / "base.gguf", tmp_path / "merged.gguf", tmp_path / "adapter.gguf"
    assert main(["convert", "to-gguf", str(trained[name]), str(base), "--dtype", dtype, "--no-verify"]) == 0
    assert main(["convert", "to-gguf", str(ckpt), str(merged), "--dtype", dtype, "--no-verify"]) == 0
    to_gguf_lora(ckpt, adapter, dtype, verify=False)
    model = read_model(ckpt)  # merged into its base
    tokens = probe_tokens(model.model.vocab_size, model.model.max_position_embeddings)[0]

    def logits(path, **lora):
        # NOTE: an f32 KV cache: llama.cpp's default f16 one alone rounds these logits by ~1e-3
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(tokens), logits_all=True, verbose=False, n_threads=2,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **lora)
        llm.eval(tokens.tolist())
        return np.array(llm.scores[: len(tokens)])

    with_adapter = logits(base, lora_path=str(adapter))
    assert np.abs(with_adapter - logits(merged)).max() <= target
    assert np.abs(with_adapter - logits(base)).max() > 0.1  # the adapter is applied at all
    ours = scalelm_logits(model.model, model.weights, tokens[None])[0].numpy()
    assert np.abs(with_adapter - ours).max() <= target
