"""Throughput and model FLOPs utilisation (MFU), in two stated conventions.

PaLM (Chowdhery et al. 2022, appendix B), the one reported as `mfu`:
    FLOPs per token = 6 N + 12 L H Q T
    N: parameters without the position table, L layers, H heads, Q head size, T sequence length.
Megatron (Narayanan et al. 2021), reported beside it as `mfu_megatron`:
    FLOPs per token = 72 l h^2 (1 + s / 6h + V / 12 l h)      no recomputation (3 passes)
                      96 l h^2 (1 + s / 6h + V / 16 l h)      full recomputation (4 passes, logits 3)
PaLM's counts only the model's arithmetic, whatever is recomputed, so it compares runs fairly;
Megatron's counts the recomputation too, as Megatron reports it. Peak FLOP/s is the accelerator's
dense bf16/fp16 figure. On a CPU there is no peak to divide by and MFU is not reported.
"""

from __future__ import annotations

import torch

from scalelm.config import ModelConfig

# Dense bf16/fp16 tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name().
# Checked in order, so the specific names (H100 PCIe, H100 NVL) come before the general one.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
              "L40S": 362e12, "A10": 125e12, "V100": 125e12}


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


def peak_flops(device: torch.device) -> float | None:
    """The accelerator's peak, or None where unknown (every CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated, or this process's resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss
