"""LoRA exports on the models trained in tests/trained.py: a PEFT adapter beside its base's Hugging Face folder,
and a GGUF LoRA adapter for llama.cpp. Each must compute what scalelm computes with the adapters merged in.

The LoRA checkpoints are made here, not trained: random adapters (B nonzero, so the merge changes the model)
in a checkpoint directory whose manifest names the trained model as its base, as a LoRA run saves one."""

import json

import pytest
import torch

from scalelm.convert.gguf_lora import read_adapter, to_gguf_lora
from scalelm.convert.parity import probe_tokens, scalelm_logits
from scalelm.convert.peft import to_peft
from scalelm.convert.source import read_lora, read_model
from scalelm.errors import CheckpointError, ConversionError, ScalelmError
from tests.helpers.lora_checkpoints import ALL, lora_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("convert")]  # the trained models are made once, on one worker

@pytest.mark.parametrize("name, targets, rslora", [("gpt", ALL, False), ("llama", ALL, True), ("llama", ["qkv", "proj"], False)])
def test_to_peft_loads_in_peft_and_computes_the_merged_model(name, targets, rslora, trained, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = lora_checkpoint(trained[name], tmp_path / "lora", targets, rslora=rslora)
    out = tmp_path / "peft"
    report = to_peft(ckpt, out)
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert report["layout"] == ("gpt2" if name == "gpt" else "llama")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["lora_alpha"] == 8 and config["use_rslora"] is rslora and config["bias"] == "none"
    assert config["modules_to_save"] is None and config["use_dora"] is False
    assert config["fan_in_fan_out"] is (name == "gpt")
    expected = ({"qkv": ["attn.c_attn"], "proj": ["attn.c_proj"], "fc1": ["mlp.c_fc"], "fc2": ["mlp.c_proj"]} if name == "gpt"
                else {"qkv": ["q_proj", "k_proj", "v_proj"], "proj": ["o_proj"], "fc1": ["gate_proj", "up_proj"],
                      "fc2": ["down_proj"]})
    assert config["target_modules"] == [m for t in targets for m in expected[t]]

    # loaded as a user would, independently of the export's own check
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32), out)
    merged = read_model(ckpt)  # the LoRA checkpoint read whole: its adapters merged into its base
    tokens = probe_tokens(merged.model.vocab_size, merged.model.max_position_embeddings)
    ours = scalelm_logits(merged.model, merged.weights, tokens)
    with torch.no_grad():
        theirs = adapted.eval()(input_ids=tokens).logits
        with adapted.disable_adapter():
            plain = adapted(input_ids=tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert (plain - theirs).abs().max() > 0.1  # the adapters change the model: the check above is not vacuous
    base = read_model(trained[name])
    assert (plain - scalelm_logits(base.model, base.weights, tokens)).abs().max() <= 1e-4  # OUT/base is the base


@pytest.mark.parametrize("name, dtype, rslora", [("gpt", "f32", False), ("llama", "f32", True), ("llama", "f16", False)])
def test_to_gguf_lora_holds_the_adapters_as_llama_cpp_applies_them(name, dtype, rslora, trained, tmp_path):
    import gguf

    ckpt = lora_checkpoint(trained[name], tmp_path / "lora", ALL, rslora=rslora)
    out = tmp_path / "adapter.gguf"
    report = to_gguf_lora(ckpt, out, dtype)
    assert report["parity"]["max_abs_diff"] <= {"f32": 1e-4, "f16": 1e-2}[dtype]
    assert report["alpha"] == pytest.approx(8.0 * (2.0 if rslora else 1.0))  # alpha sqrt(r) for rsLoRA, r = 4

    reader = gguf.GGUFReader(str(out))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == ("gpt2" if name == "gpt" else "llama")
    tensors, alpha = read_adapter(out)
    assert alpha == pytest.approx(report["alpha"])
    assert {t.tensor_type.name for t in reader.tensors} == {dtype.upper()}
    layer = (["attn_qkv", "attn_output", "ffn_up", "ffn_down"] if name == "gpt"
             else ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"])
    assert sorted(tensors) == sorted(f"blk.{i}.{t}.weight.lora_{s}" for i in range(2) for t in layer for s in "ab")
    assert tensors["blk.0.ffn_up.weight.lora_a"].shape == (4, 64) and tensors["blk.0.ffn_up.weight.lora_b"].shape == (256, 4)


def test_a_checkpoint_without_adapters_is_one_clear_error(trained, tmp_path):
    with pytest.raises(ScalelmError) as e:
        to_peft(trained["gpt"], tmp_path / "out")
    assert "holds no LoRA adapters" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConversionError, match="--dtype q8_0: a GGUF LoRA adapter is written as f32 or f16"):
        to_gguf_lora(trained["gpt"], tmp_path / "out.gguf", "q8_0")


def test_a_missing_base_names_the_base_flag(trained, tmp_path):
    ckpt = lora_checkpoint(trained["llama"], tmp_path / "lora", ["qkv"], base_path=str(tmp_path / "moved-away"))
    for export in (lambda: to_peft(ckpt, tmp_path / "out"), lambda: to_gguf_lora(ckpt, tmp_path / "out.gguf")):
        with pytest.raises(CheckpointError) as e:
            export()
        assert "moved-away" in str(e.value) and "--base" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="is not the base .* give that base with --base"):
        read_lora(ckpt, trained["gpt"])
    base, adapters, settings = read_lora(ckpt, trained["llama"])  # found where it was moved to
    assert settings.targets == ["qkv"] and len(adapters) == 2 * base.model.num_layers
