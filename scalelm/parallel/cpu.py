"""Run megatron-core's tensor-parallel layers on the CPU: the few CUDA-only calls they make, redirected.

megatron-core 0.16.1 builds and runs its layers on CPU once these calls answer for the CPU:

    torch.cuda.current_device()                  where tensors are made      -> the CPU device
    torch.cuda.get_rng_state / set_rng_state     the model-parallel RNG tracker forks dropout
    torch.cuda.random.get_rng_state / set_...    streams by saving and restoring the "CUDA"
    torch.cuda.manual_seed                       generator; on the CPU that is torch's default one
    tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state   (megatron's own wrappers)

Layers must also be built with `use_cpu_initialization=True` and the fused kernels off, which
`scalelm.model.spec.transformer_config` does on the CPU. `use_cpu()` is applied once per process and
only when training on the CPU; on a GPU nothing here runs. tests/unit/test_cpu.py fails when a
megatron-core upgrade puts a CUDA call on the path scalelm uses that this module does not cover.
"""

from __future__ import annotations

import logging

import torch

# What use_cpu() replaces: (module, attribute) pairs, named for the test that checks coverage.
REDIRECTED = (
    "torch.cuda.current_device",
    "torch.cuda.get_rng_state",
    "torch.cuda.set_rng_state",
    "torch.cuda.random.get_rng_state",
    "torch.cuda.random.set_rng_state",
    "torch.cuda.manual_seed",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
)

_applied = False


def use_cpu() -> None:
    """Point megatron-core's CUDA-only calls at the CPU (idempotent). Call before building layers."""
    global _applied  # NOTE: the one process-wide switch; it only ever turns on, and only on CPU runs
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("use_cpu() redirects CUDA calls to the CPU and must not run where CUDA is in use")
    import megatron.core.tensor_parallel.random as megatron_random

    def get_state(*args, **kwargs) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(state: torch.Tensor, *args, **kwargs) -> None:
        torch.set_rng_state(state)

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = get_state
    torch.cuda.set_rng_state = torch.cuda.random.set_rng_state = set_state
    # NOTE: megatron's tracker seeds a stream by seeding "the CUDA generator" between a save and a
    # restore of its state; with the CPU generator standing in, seeding it is exactly that.
    torch.cuda.manual_seed = torch.manual_seed
    megatron_random._get_cuda_rng_state = get_state
    megatron_random._set_cuda_rng_state = set_state
    # NOTE: with one generator standing in for both, every dropout inside a tracker fork "changes the
    # CPU RNG state", and megatron logs a warning each time. The streams are still kept apart: the fork
    # saves the generator's state before and restores it after.
    logging.getLogger(megatron_random.__name__).setLevel(logging.ERROR)
    _applied = True
