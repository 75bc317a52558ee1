"""The model's size in the two conventions MFU is reported in: parameters, and FLOPs per token.

PaLM (Chowdhery et al. 2022, appendix B), the one reported as `mfu`:
    FLOPs per token = 6 N + 12 L H Q T
    N: parameters without the position table, L layers, H heads, Q head size, T sequence length.
Megatron (Narayanan et al. 2021), reported beside it as `mfu_megatron`:
    FLOPs per token = 72 l h^2 (1 + s / 6h + V / 12 l h)      no recomputation (3 passes)
                      96 l h^2 (1 + s / 6h + V / 16 l h)      full recomputation (4 passes, logits 3)
PaLM's counts only the model's arithmetic, whatever is recomputed, so it compares runs fairly;
Megatron's counts the recomputation too, as Megatron reports it. Arithmetic on the config alone: `scalelm plan`
uses it before anything is built, training (train/metrics.py) to report MFU.
"""

from __future__ import annotations

from scalelm.config import ModelConfig


def parameter_count(model: ModelConfig, vocab_size: int) -> int:
    """Parameters of the whole model, position table excluded (PaLM's N)."""
    h, f, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    kv = h // model.num_heads * model.num_kv_heads
    bias = model.bias
    attention = h * (h + 2 * kv) + h * h + (h + 2 * kv + h if bias else 0)
    mlp = (3 if model.activation == "swiglu" else 2) * h * f + ((2 * f if model.activation == "swiglu" else f) + h
                                                                 if bias else 0)
    norms = 2 * h * (2 if bias and model.normalization == "layernorm" else 1)
    embeddings = vocab_size * h * (1 if model.tie_embeddings else 2)
    final_norm = h * (2 if bias and model.normalization == "layernorm" else 1)
    return L * (attention + mlp + norms) + embeddings + final_norm


def flops_per_token_palm(model: ModelConfig, vocab_size: int, seq_len: int) -> float:
    head = model.hidden_size // model.num_heads
    return 6 * parameter_count(model, vocab_size) + 12 * model.num_layers * model.num_heads * head * seq_len


def flops_per_token_megatron(model: ModelConfig, vocab_size: int, seq_len: int, full_recompute: bool) -> float:
    layers, h, s, V = model.num_layers, model.hidden_size, seq_len, vocab_size
    if full_recompute:
        return 96 * layers * h * h * (1 + s / (6 * h) + V / (16 * layers * h))
    return 72 * layers * h * h * (1 + s / (6 * h) + V / (12 * layers * h))
