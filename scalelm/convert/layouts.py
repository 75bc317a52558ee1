"""How scalelm's tensors become Hugging Face's and back: the GPT-2 layout and the Llama layout.

Pure functions on dicts of whole tensors; no files, no process group. scalelm's names are those of
`scalelm.model.gpt.GPT` in one process (what checkpoints store):

    embedding.word.weight                           (V_pad, h)  rows >= V are padding, always zero
    embedding.position.weight                       (P, h)      learned positions only
    blocks.N.layer.input_layernorm.{weight,bias}
    blocks.N.layer.self_attention.linear_qkv.{weight,bias}    ((nq + 2 nkv) d, h), fused, see below
    blocks.N.layer.self_attention.linear_proj.{weight,bias}   (h, nq d)
    blocks.N.layer.pre_mlp_layernorm.{weight,bias}
    blocks.N.layer.mlp.linear_fc1.{weight,bias}     (f, h), or (2f, h) = [gate; up] for SwiGLU
    blocks.N.layer.mlp.linear_fc2.{weight,bias}     (h, f)
    norm.norm.{weight,bias}
    head.linear.weight                              (V_pad, h)  untied embeddings only

megatron fuses Q, K and V per query group: the rows of linear_qkv are nkv groups, each holding its
nq/nkv query heads, then its key head, then its value head, d rows per head:

    [q_0 .. q_{r-1}, k_0, v_0 | q_r .. q_{2r-1}, k_1, v_1 | ...]      r = nq / nkv

Hugging Face keeps Q, K and V apart (Llama: q_proj, k_proj, v_proj) or concatenated whole
([Q; K; V], GPT-2's c_attn). GPT-2's linears are Conv1D, y = x W + b with W (in, out): the
transpose of torch's Linear, so every GPT-2 matrix is transposed on the way.
"""

from __future__ import annotations

import torch

from scalelm.config import ModelConfig
from scalelm.errors import ConversionError
from scalelm.model.spec import local_name, padded_vocab_size

GPT2, LLAMA = "gpt2", "llama"



def hf_layout(model: ModelConfig) -> str:
    """GPT2 or LLAMA: the Hugging Face layout that computes exactly this model, or a ConfigError naming the field."""
    if not model.causal:
        raise ConversionError("model.causal=false: a bidirectional model, and the GPT-2 and Llama layouts (GGUF's too) "
                              "are causal decoders, which would compute another function")
    kind = (model.position_embedding, model.normalization, model.activation)
    if kind == ("learned", "layernorm", "gelu"):
        if model.num_kv_heads not in (None, model.num_heads):
            raise ConversionError(f"model.num_kv_heads={model.num_kv_heads}: the GPT-2 layout has no grouped-query "
                              f"attention; only the Llama layout (rope, rmsnorm, swiglu) does")
        return GPT2
    if kind == ("rope", "rmsnorm", "swiglu"):
        return LLAMA
    raise ConversionError(f"model.position_embedding={kind[0]}, model.normalization={kind[1]}, model.activation={kind[2]}: "
                      f"no Hugging Face layout computes this model; GPT-2 is learned+layernorm+gelu, "
                      f"Llama is rope+rmsnorm+swiglu")


def normalise_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The local layer spec's names for a checkpoint written with Transformer Engine's."""
    out = {}
    for name, tensor in weights.items():
        out[local_name(name)] = tensor
    return out


def to_hf(model: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """scalelm's tensors -> the Hugging Face state dict of hf_layout(model); the vocabulary unpadded."""
    layout, w = hf_layout(model), _Need(weights)
    V, heads, groups = model.vocab_size, model.num_heads, model.num_kv_heads or model.num_heads
    d = model.hidden_size // heads
    out: dict[str, torch.Tensor] = {}
    for i in range(model.num_layers):
        b = f"blocks.{i}.layer."
        q, k, v = split_qkv(w[b + "self_attention.linear_qkv.weight"], heads, groups, d)
        qb, kb, vb = (split_qkv(w[b + "self_attention.linear_qkv.bias"], heads, groups, d)
                      if model.bias else (None, None, None))
        if layout == GPT2:
            h = f"transformer.h.{i}."
            out |= {h + "ln_1.weight": w[b + "input_layernorm.weight"], h + "ln_1.bias": _bias(w, b + "input_layernorm", model),
                    h + "attn.c_attn.weight": torch.cat([q, k, v]).t(),
                    h + "attn.c_attn.bias": torch.cat([qb, kb, vb]) if model.bias else _zeros(3 * model.hidden_size),
                    h + "attn.c_proj.weight": w[b + "self_attention.linear_proj.weight"].t(),
                    h + "attn.c_proj.bias": _bias(w, b + "self_attention.linear_proj", model),
                    h + "ln_2.weight": w[b + "pre_mlp_layernorm.weight"], h + "ln_2.bias": _bias(w, b + "pre_mlp_layernorm", model),
                    h + "mlp.c_fc.weight": w[b + "mlp.linear_fc1.weight"].t(),
                    h + "mlp.c_fc.bias": _bias(w, b + "mlp.linear_fc1", model),
                    h + "mlp.c_proj.weight": w[b + "mlp.linear_fc2.weight"].t(),
                    h + "mlp.c_proj.bias": _bias(w, b + "mlp.linear_fc2", model)}
        else:
            h = f"model.layers.{i}."
            gate, up = w[b + "mlp.linear_fc1.weight"].chunk(2)
            out |= {h + "input_layernorm.weight": w[b + "input_layernorm.weight"],
                    h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
                    h + "self_attn.o_proj.weight": w[b + "self_attention.linear_proj.weight"],
                    h + "post_attention_layernorm.weight": w[b + "pre_mlp_layernorm.weight"],
                    h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                    h + "mlp.down_proj.weight": w[b + "mlp.linear_fc2.weight"]}
            if model.bias:
                gate_b, up_b = w[b + "mlp.linear_fc1.bias"].chunk(2)
                out |= {h + "self_attn.q_proj.bias": qb, h + "self_attn.k_proj.bias": kb, h + "self_attn.v_proj.bias": vb,
                        h + "self_attn.o_proj.bias": w[b + "self_attention.linear_proj.bias"],
                        h + "mlp.gate_proj.bias": gate_b, h + "mlp.up_proj.bias": up_b,
                        h + "mlp.down_proj.bias": w[b + "mlp.linear_fc2.bias"]}
    word = w["embedding.word.weight"][:V]
    if layout == GPT2:
        out |= {"transformer.wte.weight": word, "transformer.wpe.weight": w["embedding.position.weight"],
                "transformer.ln_f.weight": w["norm.norm.weight"], "transformer.ln_f.bias": _bias(w, "norm.norm", model)}
    else:
        out |= {"model.embed_tokens.weight": word, "model.norm.weight": w["norm.norm.weight"]}
    if "head.score" in weights:  # a classification head: *ForSequenceClassification's `score`
        out["score.weight"] = w["head.score"]
    elif not model.tie_embeddings:
        out["lm_head.weight"] = w["head.linear.weight"][:V]
    return {name: t.contiguous() for name, t in out.items()}


def score_labels(weights: dict[str, torch.Tensor]) -> int | None:
    """The outputs of a classification head (finetune.head=classification) among `weights`, None for a language model."""
    return weights["head.score"].shape[0] if "head.score" in weights else None


def from_hf(model: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict of hf_layout(model) -> scalelm's tensors, the vocabulary padded with zero rows.
    The exact inverse of `to_hf`."""
    layout, s = hf_layout(model), _Need(state)
    V, heads, groups = model.vocab_size, model.num_heads, model.num_kv_heads or model.num_heads
    d = model.hidden_size // heads
    out: dict[str, torch.Tensor] = {}
    for i in range(model.num_layers):
        b = f"blocks.{i}.layer."
        if layout == GPT2:
            h = f"transformer.h.{i}."
            qkv = s[h + "attn.c_attn.weight"].t()  # (3 h, h) = [Q; K; V]
            out |= {b + "input_layernorm.weight": s[h + "ln_1.weight"],
                    b + "self_attention.linear_qkv.weight": fuse_qkv(*qkv.chunk(3), heads, groups, d),
                    b + "self_attention.linear_proj.weight": s[h + "attn.c_proj.weight"].t(),
                    b + "pre_mlp_layernorm.weight": s[h + "ln_2.weight"],
                    b + "mlp.linear_fc1.weight": s[h + "mlp.c_fc.weight"].t(),
                    b + "mlp.linear_fc2.weight": s[h + "mlp.c_proj.weight"].t()}
            if model.bias:
                out |= {b + "input_layernorm.bias": s[h + "ln_1.bias"],
                        b + "self_attention.linear_qkv.bias": fuse_qkv(*s[h + "attn.c_attn.bias"].chunk(3), heads, groups, d),
                        b + "self_attention.linear_proj.bias": s[h + "attn.c_proj.bias"],
                        b + "pre_mlp_layernorm.bias": s[h + "ln_2.bias"],
                        b + "mlp.linear_fc1.bias": s[h + "mlp.c_fc.bias"], b + "mlp.linear_fc2.bias": s[h + "mlp.c_proj.bias"]}
        else:
            h = f"model.layers.{i}."
            a = h + "self_attn."
            out |= {b + "input_layernorm.weight": s[h + "input_layernorm.weight"],
                    b + "self_attention.linear_qkv.weight": fuse_qkv(s[a + "q_proj.weight"], s[a + "k_proj.weight"],
                                                                     s[a + "v_proj.weight"], heads, groups, d),
                    b + "self_attention.linear_proj.weight": s[a + "o_proj.weight"],
                    b + "pre_mlp_layernorm.weight": s[h + "post_attention_layernorm.weight"],
                    b + "mlp.linear_fc1.weight": torch.cat([s[h + "mlp.gate_proj.weight"], s[h + "mlp.up_proj.weight"]]),
                    b + "mlp.linear_fc2.weight": s[h + "mlp.down_proj.weight"]}
            if model.bias:
                out |= {b + "self_attention.linear_qkv.bias": fuse_qkv(s[a + "q_proj.bias"], s[a + "k_proj.bias"],
                                                                       s[a + "v_proj.bias"], heads, groups, d),
                        b + "self_attention.linear_proj.bias": s[a + "o_proj.bias"],
                        b + "mlp.linear_fc1.bias": torch.cat([s[h + "mlp.gate_proj.bias"], s[h + "mlp.up_proj.bias"]]),
                        b + "mlp.linear_fc2.bias": s[h + "mlp.down_proj.bias"]}
    if layout == GPT2:
        out |= {"embedding.word.weight": _pad_rows(s["transformer.wte.weight"], V),
                "embedding.position.weight": s["transformer.wpe.weight"], "norm.norm.weight": s["transformer.ln_f.weight"]}
        if model.bias:
            out["norm.norm.bias"] = s["transformer.ln_f.bias"]
    else:
        out |= {"embedding.word.weight": _pad_rows(s["model.embed_tokens.weight"], V), "norm.norm.weight": s["model.norm.weight"]}
    if not model.tie_embeddings:
        out["head.linear.weight"] = _pad_rows(s["lm_head.weight"], V)
    return {name: t.float().contiguous() for name, t in out.items()}


def split_qkv(fused: torch.Tensor, heads: int, groups: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's per-group fused rows -> (Q (heads d, ...), K (groups d, ...), V (groups d, ...))."""
    rest = fused.shape[1:]
    per_group = fused.reshape(groups, (heads // groups + 2) * d, *rest)  # (groups, (r + 2) d, ...)
    q, k, v = per_group.split([heads // groups * d, d, d], dim=1)
    return q.reshape(heads * d, *rest), k.reshape(groups * d, *rest), v.reshape(groups * d, *rest)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, d: int) -> torch.Tensor:
    """The inverse of `split_qkv`."""
    rest = q.shape[1:]
    per_group = torch.cat([q.reshape(groups, heads // groups * d, *rest), k.reshape(groups, d, *rest),
                           v.reshape(groups, d, *rest)], dim=1)  # (groups, (r + 2) d, ...)
    return per_group.reshape((heads + 2 * groups) * d, *rest)


class _Need(dict):
    """A dict whose missing key is a one-line error naming the tensor."""

    def __missing__(self, name: str):
        raise ConversionError(f"tensor {name} is missing: the weights do not hold the model their config describes")


def _bias(w: dict, prefix: str, model: ModelConfig) -> torch.Tensor:
    """A bias, or zeros for a model without biases (GPT-2's layout always has them; zeros change nothing)."""
    return w[prefix + ".bias"] if model.bias else _zeros(model.hidden_size if "fc1" not in prefix else w[prefix + ".weight"].shape[0])


def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n)


def _pad_rows(table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V, h) -> (V_pad, h) with zero rows: scalelm's padding, never a token."""
    if table.shape[0] != vocab_size:
        raise ConversionError(f"an embedding table has {table.shape[0]} rows but vocab_size is {vocab_size}")
    padded = torch.zeros(padded_vocab_size(vocab_size), *table.shape[1:], dtype=table.dtype)
    padded[:vocab_size] = table
    return padded
