"""Throughput and model FLOPs utilisation (MFU): tokens/s against the accelerator's peak, the model's FLOPs per token
counted in PaLM's and in Megatron's convention (model/size.py). Peak FLOP/s is the accelerator's dense bf16/fp16
figure; on a CPU there is no peak to divide by and MFU is not reported.
"""

from __future__ import annotations

import torch

# Dense bf16/fp16 tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name().
# Checked in order, so the specific names (H100 PCIe, H100 NVL) come before the general one.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
              "L40S": 362e12, "A10": 125e12, "V100": 125e12}


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
