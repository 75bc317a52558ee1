"""Conversion, generation and evaluation on models trained here in two parallel layouts: a GPT-3-style
model from tensor 2 x pipeline 2, a Llama-style one (RoPE, RMSNorm, SwiGLU, grouped-query attention,
untied head) from ZeRO-3 over 2 data-parallel ranks. Each export must compute what scalelm computes."""

import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from scalelm.checkpoint import store
from scalelm.cli import main
from scalelm.convert.gguf import read_gguf
from scalelm.convert.source import read_model
from scalelm.generation.sampling import Sampling
from scalelm.infer.evaluate import evaluate_hf
from scalelm.infer.generate_hf import generate
from tests.helpers.ranks import run_ranks
from tests.helpers.trained import MODELS, TINY
from tests.helpers.workloads import evaluate_run, pretrain_run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("convert")]  # one worker, which trains the models once


def parity_of(out: str) -> float:
    return float(re.search(r"max \|Δlogit\| = (\S+)", out).group(1))


@pytest.mark.parametrize("name", MODELS)
def test_to_hf_loads_offline_and_matches_scalelm(name, trained, pipeline, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    assert main(["convert", "to-hf", str(trained[name]), str(out)]) == 0
    printed = capsys.readouterr().out
    assert parity_of(printed) <= 1e-4 and ("gpt2 layout" if name == "gpt" else "llama layout") in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == ("GPT2LMHeadModel" if name == "gpt" else "LlamaForCausalLM")
    tokenizer = AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(pipeline["tokenizer"]))
    for text in ["The river runs   far.\nNew line!", " a leading space", "ünïcödé 東京 😀", "<|user|>"]:
        ids = tokenizer(text)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(text) and tokenizer.decode(ids[1:]) == text
    chat = tokenizer.apply_chat_template([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
                                         add_generation_prompt=True, tokenize=False)
    assert chat == "<s><|system|>\nBe terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    assert stops == [sp.eos_id(), sp.piece_to_id("<|end|>")]


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_through_hugging_face_is_exact(name, trained, exported, tmp_path, capsys):
    back = tmp_path / "back"
    assert main(["convert", "from-hf", str(exported[name]), str(back)]) == 0
    assert parity_of(capsys.readouterr().out) <= 1e-4
    original, again = read_model(trained[name]), read_model(back)
    assert again.model == original.model
    assert again.weights.keys() == original.weights.keys()
    assert all(again.weights[k].equal(original.weights[k]) for k in original.weights)  # the padding too: it is zero
    assert again.tokenizer.read_bytes() == original.tokenizer.read_bytes()


def test_a_converted_model_trains_and_evaluates_in_another_layout(trained, exported, pipeline, tmp_path):
    """from-hf's weights-only checkpoint starts a tensor-parallel run (at lr 1e-30 the weights come back unchanged),
    and its in-framework perplexity is the Hugging Face one."""
    back = tmp_path / "back"
    assert main(["convert", "from-hf", str(exported["llama"]), str(back), "--no-verify"]) == 0
    config = back / "config.yaml"
    run = tmp_path / "run"
    run_ranks(2, pretrain_run, [f"--config={config}", f"data.train={pipeline['shards']}", f"log.dir={run}", *TINY,
                                "parallel.tensor=2", "train.steps=1", "optim.lr=1e-30", "optim.min_lr=1e-30"])
    assert "started from the weights of" in (run / "events.log").read_text()
    after, before = read_model(run / "checkpoints"), read_model(back)
    assert all(after.weights[k].equal(before.weights[k]) for k in before.weights)

    shards = [str(pipeline["shards"])]
    theirs = evaluate_hf(exported["llama"], shards, "val", 32, 2, 8)
    ours = run_ranks(2, evaluate_run, back, shards, 8, ["parallel.tensor=2", "train.micro_batch_size=2", "train.precision=fp32"])[0]
    assert ours.windows == theirs.windows == 8
    assert abs(ours.perplexity - theirs.perplexity) <= 1e-3 * theirs.perplexity
    gpt = run_ranks(2, evaluate_run, trained["gpt"], shards, 8, ["parallel.zero_stage=3", "train.micro_batch_size=2"])[0]
    gpt_hf = evaluate_hf(exported["gpt"], shards, "val", 32, 2, 8)
    assert abs(gpt.perplexity - gpt_hf.perplexity) <= 1e-3 * gpt_hf.perplexity


@pytest.mark.parametrize("name, dtype, target", [("gpt", "f32", 1e-4), ("gpt", "f16", 1e-2), ("gpt", "q8_0", 0.5),
                                                 ("llama", "f16", 1e-2), ("llama", "q8_0", 0.5)])
def test_to_gguf_holds_the_model_and_its_tokenizer(name, dtype, target, trained, pipeline, tmp_path, capsys):
    import gguf

    out = tmp_path / "model.gguf"
    assert main(["convert", "to-gguf", str(trained[name]), str(out), "--dtype", dtype]) == 0
    assert parity_of(capsys.readouterr().out) <= target
    reader = gguf.GGUFReader(str(out))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == ("gpt2" if name == "gpt" else "llama")
    sp = spm.SentencePieceProcessor(model_file=str(pipeline["tokenizer"]))
    tensors, vocab = read_gguf(out)
    assert vocab == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    matrix = "blk.0.ffn_up.weight"
    assert types[matrix] == dtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert tensors[matrix].shape == (256, 64)


def test_generate_is_deterministic_for_a_seed(trained, exported):
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=7)
    first = generate(exported["gpt"], "The river", sampling, stream=False)
    assert first and generate(exported["gpt"], "The river", sampling, stream=False) == first
    assert generate(trained["gpt"], "The river", sampling, stream=False) == first  # a checkpoint, converted on the fly
    others = {generate(exported["gpt"], "The river", Sampling(12, 1.0, seed=s), stream=False) for s in (8, 9, 10)}
    assert others - {first}
    greedy = Sampling(max_new_tokens=8, temperature=0)
    assert generate(exported["llama"], "Hi", greedy, chat=True, stream=False) == \
        generate(exported["llama"], "Hi", greedy, chat=True, stream=False)


def test_generate_streams_to_the_terminal(exported, capsys):
    assert main(["generate", str(exported["gpt"]), "--prompt", "The river", "--max-new-tokens", "8", "--seed", "7"]) == 0
    streamed = capsys.readouterr().out.strip()
    assert streamed and streamed == generate(exported["gpt"], "The river", Sampling(8, 0.8, 50, 0.95, seed=7), stream=False).strip()


def test_eval_prints_the_same_perplexity_for_checkpoint_and_export(trained, exported, pipeline, capsys):
    for model in (trained["gpt"], exported["gpt"]):
        assert main(["eval", str(model), "--data", str(pipeline["shards"]), "--windows", "6", "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    values = [float(re.search(r"perplexity (\S+)", line).group(1)) for line in lines[-2:]]
    assert "over 6 val windows of 32 tokens" in lines[-1] and abs(values[0] - values[1]) <= 1e-3 * values[1]


def _edited_hf(exported: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(exported, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


def _consolidated(trained: Path, tmp_path: Path, drop: str | None = None, **model_changes) -> Path:
    whole, out = tmp_path / "whole.safetensors", tmp_path / "model.safetensors"
    assert main(["checkpoint", "consolidate", str(trained), "--out", str(whole)]) == 0
    from safetensors import safe_open

    with safe_open(whole, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != drop}
    meta["model"] = json.dumps({**json.loads(meta["model"]), **model_changes})
    store.write_tensors(out, tensors, meta)
    return out


@pytest.mark.parametrize("case, message", [
    ("no-layout", "model.normalization=rmsnorm, model.activation=gelu: no Hugging Face layout computes this model"),
    ("missing-tensor", "tensor blocks.1.layer.mlp.linear_fc2.weight is missing"),
    ("gelu-tanh", "activation_function='gelu_new'"),
    ("rope-scaling", "rope_scaling"),
    ("pickle-only", "only pytorch_model.bin, a pickle"),
    ("gguf-dtype", "--dtype q4_0: GGUF export writes f32, f16, q8_0"),
    ("long-prompt", "the model's context is 32"),
    ("hf-no-such-dir", "config.json is missing"),
])
def test_bad_input_is_one_clear_error(case, message, trained, exported, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = {
        "no-layout": lambda: ["convert", "to-hf", str(_consolidated(trained["gpt"], tmp_path, normalization="rmsnorm")), out],
        "missing-tensor": lambda: ["convert", "to-hf",
                                   str(_consolidated(trained["gpt"], tmp_path, drop="blocks.1.layer.mlp.linear_fc2.weight")), out],
        "gelu-tanh": lambda: ["convert", "from-hf", str(_edited_hf(exported["gpt"], tmp_path, activation_function="gelu_new")), out],
        "rope-scaling": lambda: ["convert", "from-hf", str(_edited_hf(exported["llama"], tmp_path,
                                 rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})), out],
        "pickle-only": lambda: _pickle_only(exported["gpt"], tmp_path, out),
        "gguf-dtype": lambda: ["convert", "to-gguf", str(trained["gpt"]), out + ".gguf", "--dtype", "q4_0"],
        "long-prompt": lambda: ["generate", str(exported["gpt"]), "--prompt", "word " * 40],
        "hf-no-such-dir": lambda: ["convert", "from-hf", str(tmp_path / "nothing"), out],
    }[case]()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("scalelm: error: ") and err.count("\n") == 1 and message in err


def _pickle_only(exported: Path, tmp_path: Path, out: str) -> list[str]:
    copy = tmp_path / "pickled"
    shutil.copytree(exported, copy)
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    return ["convert", "from-hf", str(copy), out]


def test_parity_is_computed_on_the_real_vocabulary_only(trained):
    found = read_model(trained["llama"])
    word = found.weights["embedding.word.weight"]
    assert word.shape[0] == 512 and found.model.vocab_size == 400
    assert torch.count_nonzero(word[400:]) == 0  # training never moved the padding
