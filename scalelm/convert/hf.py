"""`scalelm convert to-hf` and `from-hf`: a Hugging Face folder in the GPT-2 or Llama layout, and back.

    OUT_DIR/
      config.json, generation_config.json     GPT2LMHeadModel or LlamaForCausalLM, fp32 (a classification head:
                                              GPT2ForSequenceClassification or LlamaForSequenceClassification)
      model.safetensors                       (or model-0000K-of-0000N.safetensors + an index past 5 GB)
      tokenizer.model, tokenizer_config.json  the run's SentencePiece model, with the chat template
      special_tokens_map.json

`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)` load it
offline. Which layout is the model's decides (convert/layouts.py); both directions end with a parity
check of the converted model against scalelm's forward. Files alone, no process group.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from scalelm.checkpoint import store
from scalelm.config import ModelConfig
from scalelm.convert import layouts, parity
from scalelm.convert.source import ScalelmModel, read_model, write_weights_only
from scalelm.convert.vocab import specials, write_hf_tokenizer
from scalelm.data.files import make_dir
from scalelm.errors import ConversionError

SHARD_BYTES = 5 << 30  # Hugging Face's customary largest weight file
HF_TARGET = 1e-4  # max |Δlogit| in fp32


def to_hf(source: Path, out: Path, tokenizer: Path | None = None, verify: bool = True, base: Path | None = None) -> dict:
    """Write the Hugging Face folder of the scalelm model at `source` (checkpoint or consolidated file); a LoRA
    checkpoint's adapters are merged into its base (found at `base`, else where the checkpoint names it)."""
    found = read_model(source, tokenizer, base=base)
    model = found.model
    files, parameters = write_hf_folder(found, out)
    report = {"source": found.origin, "layout": layouts.hf_layout(model), "files": files, "tokenizer": bool(found.tokenizer),
              "parameters": parameters}
    if verify:
        report["parity"] = parity.check(model, found.weights, out, HF_TARGET)
    return report


def write_hf_folder(found: ScalelmModel, out: Path, what: str = "OUT_DIR") -> tuple[list[str], int]:
    """The Hugging Face folder of `found` (config, generation config, weights, tokenizer): (the weight files,
    the parameters)."""
    model = found.model
    state = layouts.to_hf(model, found.weights)
    make_dir(out, what)
    ids = specials(found.tokenizer) if found.tokenizer else None
    hf_config(model, ids, layouts.score_labels(found.weights)).save_pretrained(out)
    _generation_config(ids).save_pretrained(out)
    files = write_weights(out, state)
    if found.tokenizer:
        write_hf_tokenizer(found.tokenizer, out, model.max_position_embeddings)
    return files, sum(t.numel() for t in state.values())


def from_hf(hf_dir: Path, out: Path, verify: bool = True) -> dict:
    """Write a weights-only scalelm checkpoint of the GPT-2- or Llama-layout model in `hf_dir`."""
    hf_dir = Path(hf_dir)
    raw = _read_json(hf_dir / "config.json")
    model = model_config(raw)
    state = read_hf_weights(hf_dir)
    weights = layouts.from_hf(model, state)
    tokenizer = hf_dir / "tokenizer.model" if (hf_dir / "tokenizer.model").is_file() else None
    config = write_weights_only(out, model, weights, tokenizer, source=f"Hugging Face {raw['model_type']} {hf_dir}")
    report = {"source": str(hf_dir), "layout": raw["model_type"], "config": str(config), "tokenizer": bool(tokenizer),
              "parameters": sum(t.numel() for t in state.values())}
    if verify:
        report["parity"] = parity.check(model, weights, hf_dir, HF_TARGET)
    return report


def hf_config(model: ModelConfig, ids=None, num_labels: int | None = None):
    """The transformers config of the model's layout: a causal LM, or with `num_labels` (a classification head)
    GPT2ForSequenceClassification / LlamaForSequenceClassification."""
    from transformers import GPT2Config, LlamaConfig

    tokens = {"bos_token_id": ids.bos, "eos_token_id": ids.eos, "pad_token_id": ids.pad if ids.pad >= 0 else None} if ids else {}
    common = {"vocab_size": model.vocab_size, "tie_word_embeddings": model.tie_embeddings,
              "initializer_range": model.init_std, "architectures": None, **tokens}
    if layouts.hf_layout(model) == layouts.GPT2:
        config = GPT2Config(n_positions=model.max_position_embeddings, n_embd=model.hidden_size, n_layer=model.num_layers,
                            n_head=model.num_heads, n_inner=model.ffn_hidden_size, activation_function="gelu",
                            layer_norm_epsilon=model.norm_eps, resid_pdrop=model.dropout, embd_pdrop=model.dropout,
                            attn_pdrop=model.attention_dropout, **common)
        config.architectures = ["GPT2ForSequenceClassification" if num_labels else "GPT2LMHeadModel"]
    else:
        config = LlamaConfig(hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
                             num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
                             num_key_value_heads=model.num_kv_heads or model.num_heads,
                             head_dim=model.hidden_size // model.num_heads,
                             max_position_embeddings=model.max_position_embeddings, rms_norm_eps=model.norm_eps,
                             rope_parameters={"rope_type": "default", "rope_theta": model.rope_base}, hidden_act="silu",
                             attention_bias=model.bias, mlp_bias=model.bias, attention_dropout=model.attention_dropout,
                             **common)
        config.architectures = ["LlamaForSequenceClassification" if num_labels else "LlamaForCausalLM"]
    if num_labels:
        config.num_labels = num_labels
    return config


def model_config(raw: dict) -> ModelConfig:
    """scalelm's ModelConfig for a Hugging Face config.json, or a ConversionError naming the field it cannot represent."""
    kind = raw.get("model_type")

    def need(field: str, ok: bool, why: str) -> None:
        if not ok:
            raise ConversionError(f"config.json: {field}={raw.get(field)!r}: {why}")

    if kind == "gpt2":
        need("activation_function", raw.get("activation_function") == "gelu",
             "scalelm's GELU is exact (erf); this model was trained with another activation")
        need("add_cross_attention", not raw.get("add_cross_attention"), "scalelm models are decoders alone")
        need("scale_attn_by_inverse_layer_idx", not raw.get("scale_attn_by_inverse_layer_idx"),
             "scalelm scales attention by 1/sqrt(head_dim) alone")
        need("scale_attn_weights", raw.get("scale_attn_weights", True), "scalelm scales attention by 1/sqrt(head_dim)")
        return ModelConfig(num_layers=raw["n_layer"], hidden_size=raw["n_embd"], num_heads=raw["n_head"],
                           num_kv_heads=raw["n_head"], ffn_hidden_size=raw.get("n_inner") or 4 * raw["n_embd"],
                           vocab_size=raw["vocab_size"], max_position_embeddings=raw["n_positions"],
                           position_embedding="learned", normalization="layernorm", activation="gelu",
                           norm_eps=raw.get("layer_norm_epsilon", 1e-5), tie_embeddings=raw.get("tie_word_embeddings", True),
                           bias=True, dropout=0.0, attention_dropout=0.0, init_std=raw.get("initializer_range", 0.02))
    if kind == "llama":
        heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        need("hidden_act", raw.get("hidden_act", "silu") == "silu", "scalelm's SwiGLU gates with SiLU")
        need("head_dim", raw.get("head_dim") in (None, hidden // heads),
             f"scalelm's heads are hidden_size / num_heads = {hidden // heads} wide")
        need("mlp_bias", bool(raw.get("mlp_bias")) == bool(raw.get("attention_bias")),
             "scalelm has one bias setting for attention and MLP alike (attention_bias differs)")
        need("rope_scaling", rope.get("rope_type", rope.get("type", "default")) == "default",
             "scalelm's RoPE has no scaling (only rope_theta)")
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        return ModelConfig(num_layers=raw["num_hidden_layers"], hidden_size=hidden, num_heads=heads,
                           num_kv_heads=raw.get("num_key_value_heads") or heads, ffn_hidden_size=raw["intermediate_size"],
                           vocab_size=raw["vocab_size"], max_position_embeddings=raw["max_position_embeddings"],
                           position_embedding="rope", rope_base=float(theta), normalization="rmsnorm", activation="swiglu",
                           norm_eps=raw.get("rms_norm_eps", 1e-6), tie_embeddings=raw.get("tie_word_embeddings", False),
                           bias=bool(raw.get("attention_bias")), dropout=0.0, attention_dropout=0.0,
                           init_std=raw.get("initializer_range", 0.02))
    raise ConversionError(f"config.json: model_type={kind!r}: scalelm reads the gpt2 and llama layouts")


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (one file, or the shards its index names)."""
    index = hf_dir / "model.safetensors.index.json"
    files = (sorted(set(_read_json(index)["weight_map"].values())) if index.is_file()
             else ["model.safetensors"] if (hf_dir / "model.safetensors").is_file() else [])
    if not files:
        pickles = sorted(p.name for p in hf_dir.glob("*.bin"))
        raise ConversionError(f"{hf_dir} holds no model.safetensors" + (f" (only {pickles[0]}, a pickle, which scalelm does "
                              "not load: save the model with safe_serialization=True)" if pickles else ""))
    state = {}
    for name in files:
        try:
            with safe_open(hf_dir / name, framework="pt") as f:
                state |= {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{hf_dir / name}: cannot read it ({e})") from None
    return state


def write_weights(out: Path, state: dict[str, torch.Tensor]) -> list[str]:
    """model.safetensors, or shards of at most SHARD_BYTES and their index."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= SHARD_BYTES:
        store.write_tensors(out / "model.safetensors", state, {"format": "pt"})
        return ["model.safetensors"]
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        if current and size + tensor.numel() * tensor.element_size() > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.numel() * tensor.element_size()
    shards.append(current)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        store.write_tensors(out / name, shard, {"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _generation_config(ids):
    """Stop at EOS, and at the end-of-turn marker when the tokenizer has one (chat replies end there)."""
    from transformers import GenerationConfig

    if ids is None:
        return GenerationConfig()
    stops = [ids.eos] + ([ids.end_of_turn] if ids.end_of_turn >= 0 else [])
    return GenerationConfig(bos_token_id=ids.bos, eos_token_id=stops if len(stops) > 1 else stops[0],
                            pad_token_id=ids.pad if ids.pad >= 0 else ids.eos)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing: give a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None

