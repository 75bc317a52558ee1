"""`scalelm convert to-peft CKPT OUT_DIR`: a LoRA checkpoint as a PEFT adapter beside its base in Hugging Face form.

    OUT_DIR/
      adapter_config.json          PEFT's LoraConfig: LORA, CAUSAL_LM, r, lora_alpha, target_modules, use_rslora
                                   (a classifier: SEQ_CLS, modules_to_save ["score"])
      adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in), .lora_B.weight (out, r), fp32
                                   (a classifier: and base_model.model.score.weight, its head)
      base/                        the base checkpoint's Hugging Face folder, as `scalelm convert to-hf` writes it

    base = AutoModelForCausalLM.from_pretrained("OUT_DIR/base")
    model = PeftModel.from_pretrained(base, "OUT_DIR")          # or vLLM: LoRARequest("name", 1, "OUT_DIR")
    # a classifier: AutoModelForSequenceClassification.from_pretrained("OUT_DIR/base", num_labels=N), then the same

The adapter goes with the weights it was trained on, so the base is always written beside it (an adapter is
nothing without it, and `base/` is exactly that base); `base_model_name_or_path` stays null, because no path
written now would still be right once the folder is moved. vLLM loads the same adapter for the Llama layout
(bias "none", no modules_to_save, no DoRA; r within its --max-lora-rank); vLLM's GPT-2 takes no LoRA.

scalelm adapts megatron's fused linears; Hugging Face keeps their parts apart. A is shared by every part of a
fused module, while B's rows go where the base weight's rows go (convert/layouts.py):

    qkv   Llama: B = [per-group q, k, v rows] -> q_proj, k_proj, v_proj      GPT-2: -> c_attn, rows [Q; K; V]
    proj  o_proj / attn.c_proj        fc1   SwiGLU's [gate; up] -> gate_proj, up_proj / mlp.c_fc
    fc2   down_proj / mlp.c_proj

so B_part A is exactly the delta of each part. GPT-2's Conv1D stores its weight (in, out), but PEFT keeps
lora_A (r, in) and lora_B (out, r) as for a Linear and transposes the delta itself (fan_in_fan_out: true).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scalelm.checkpoint import store
from scalelm.config import LoRAConfig, ModelConfig
from scalelm.config.finetune import layer_sides
from scalelm.convert import layouts, parity
from scalelm.convert.hf import HF_TARGET, write_hf_folder
from scalelm.convert.source import read_lora
from scalelm.data.files import make_dir
from scalelm.errors import ConversionError
from scalelm.model import lora as lora_math

CONFIG, WEIGHTS, BASE = "adapter_config.json", "adapter_model.safetensors", "base"
PREFIX = "base_model.model."  # PeftModel's own prefix on the wrapped model's names

# scalelm target -> the Hugging Face modules of one layer its weight becomes, in the order of its rows
MODULES = {
    layouts.LLAMA: {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "proj": ("self_attn.o_proj",),
                    "fc1": ("mlp.gate_proj", "mlp.up_proj"), "fc2": ("mlp.down_proj",)},
    layouts.GPT2: {"qkv": ("attn.c_attn",), "proj": ("attn.c_proj",), "fc1": ("mlp.c_fc",), "fc2": ("mlp.c_proj",)},
}
_LAYER = {layouts.LLAMA: "model.layers.{}.", layouts.GPT2: "transformer.h.{}."}


def to_peft(source: Path, out: Path, base: Path | None = None, tokenizer: Path | None = None, verify: bool = True) -> dict:
    """Write the PEFT adapter of the LoRA checkpoint at `source` and its base's Hugging Face folder as OUT/base;
    `base` overrides the base path the checkpoint names (its SHA-256 must match)."""
    found, adapters, settings = read_lora(source, base, tokenizer)
    model = found.model
    config, state = peft_adapter(model, adapters, settings)
    out = Path(out)
    make_dir(out, "OUT_DIR")
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    store.write_tensors(out / WEIGHTS, state, {"format": "pt"})
    base_files, _ = write_hf_folder(found, out / BASE, "OUT_DIR/base")
    report = {"source": str(source), "base": found.origin, "layout": layouts.hf_layout(model),
              "files": [CONFIG, WEIGHTS] + [f"{BASE}/{name}" for name in base_files], "tokenizer": bool(found.tokenizer),
              "targets": config["target_modules"], "parameters": sum(t.numel() for t in state.values())}
    if verify:
        report["parity"] = check(model, lora_math.merge(found.weights, adapters, settings), out)
    return report


def peft_adapter(model: ModelConfig, adapters: dict[str, torch.Tensor], lora: LoRAConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json's content, adapter_model.safetensors' tensors) of whole scalelm adapters (with a
    classification head trained beside them: SEQ_CLS, the head as PEFT's modules_to_save `score`)."""
    layout = layouts.hf_layout(model)
    head = adapters.get("head.score")
    pairs = hf_adapters(model, {k: v for k, v in adapters.items() if k not in lora_math.WHOLE}, lora)
    state = {} if head is None else {f"{PREFIX}score.weight": head}
    for module, (a, b) in pairs.items():
        state[f"{PREFIX}{module}.lora_A.weight"] = a
        state[f"{PREFIX}{module}.lora_B.weight"] = b
    modules = [m for t in lora_math.TARGETS if t in lora.targets for m in MODULES[layout][t]]
    # NOTE: PEFT matches an entry by the whole module name or its end after a dot; GPT-2 has two c_proj, so its
    # entries keep their parent's name, while Llama's are the bare names everyone (and vLLM's packing) expects
    names = [m.rsplit(".", 1)[-1] for m in modules] if layout == layouts.LLAMA else modules
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM" if head is None else "SEQ_CLS",
              "base_model_name_or_path": None, "inference_mode": True,
              "r": lora.rank, "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
              "lora_dropout": lora.dropout, "use_rslora": lora.rslora, "target_modules": names, "bias": "none",
              "fan_in_fan_out": layout == layouts.GPT2, "modules_to_save": None if head is None else ["score"], "use_dora": False,
              "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
              "alpha_pattern": {}}
    return config, {name: t.float().contiguous() for name, t in state.items()}


def hf_adapters(model: ModelConfig, adapters: dict[str, torch.Tensor], lora: LoRAConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Whole scalelm adapters -> {Hugging Face module name: (A (r, in), B (out, r))} in hf_layout(model), Linear's
    orientation for both layouts; a ConversionError when the adapters are not those `lora` describes."""
    layout = layouts.hf_layout(model)
    heads, groups = model.num_heads, model.num_kv_heads or model.num_heads
    d = model.hidden_size // heads
    expected = {f"blocks.{i}.layer.{lora_math.TARGETS[t]}.lora.{s}" for i in range(model.num_layers)
                for t in lora.targets for s in "ab"}
    if expected != set(adapters):
        odd = sorted(expected ^ set(adapters))[0]
        raise ConversionError(f"adapter {odd} is {'missing' if odd in expected else 'unexpected'}: the adapters are not "
                              f"those of finetune.lora.targets={lora.targets} on {model.num_layers} layers")
    out = {}
    for i in range(model.num_layers):
        for target in (t for t in lora_math.TARGETS if t in lora.targets):
            name = f"blocks.{i}.layer.{lora_math.TARGETS[target]}.lora."
            a, b = adapters[name + "a"], adapters[name + "b"]
            fan_in, fan_out = layer_sides(model, target)
            if tuple(a.shape) != (lora.rank, fan_in) or tuple(b.shape) != (fan_out, lora.rank):
                raise ConversionError(f"adapter {name}a/b has shapes {list(a.shape)}/{list(b.shape)}, not "
                                      f"{[lora.rank, fan_in]}/{[fan_out, lora.rank]}: it does not fit the base model")
            if target == "qkv":
                q, k, v = layouts.split_qkv(b, heads, groups, d)
                parts = (q, k, v) if layout == layouts.LLAMA else (torch.cat([q, k, v]),)
            elif target == "fc1" and layout == layouts.LLAMA:
                parts = b.chunk(2)  # [gate; up]
            else:
                parts = (b,)
            for module, rows in zip(MODULES[layout][target], parts, strict=True):
                out[_LAYER[layout].format(i) + module] = (a, rows)
    return {module: (a.contiguous(), b.contiguous()) for module, (a, b) in out.items()}


def check(model: ModelConfig, merged: dict[str, torch.Tensor], out: Path) -> dict:
    """Logits of PeftModel (OUT/base with the adapter of OUT, fp32) against scalelm's forward of the merged weights
    (a classifier's: OUT/base as *ForSequenceClassification, the scores at the last token)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        from peft import PeftModel
    except ImportError:
        raise ConversionError("the parity check loads the adapter with peft, which is not installed: pip install peft, "
                              "or pass --no-verify") from None
    labels = layouts.score_labels(merged)
    if labels:  # the base's head is a language model's: PEFT puts the trained `score` in its place
        hf = AutoModelForSequenceClassification.from_pretrained(out / BASE, dtype=torch.float32, num_labels=labels)
    else:
        hf = AutoModelForCausalLM.from_pretrained(out / BASE, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(hf, out, is_trainable=False)
    return parity.check_loaded(model, merged, adapted, HF_TARGET, f"PeftModel on {type(hf).__name__} (fp32)")
