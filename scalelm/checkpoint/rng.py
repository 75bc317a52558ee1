"""Every random stream a training step can draw from, captured and restored: python's, numpy's,
torch's (CPU and this rank's GPU) and megatron's model-parallel tracker (dropout inside and outside
tensor-parallel regions). Tensors go to a safetensors file, the rest to its JSON metadata."""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from megatron.core import tensor_parallel

TRACKER = "tracker/"


def capture() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    for name, value in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[TRACKER + name] = value
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    metadata = {"python": json.dumps(random.getstate()),
                "numpy": json.dumps([kind, keys.tolist(), pos, has_gauss, gauss])}
    return tensors, metadata


def restore(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available() and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name.removeprefix(TRACKER): value for name, value in tensors.items() if name.startswith(TRACKER)})
    version, internal, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def reseed(seed: int) -> None:
    """Fresh streams from `seed`, for a resume whose layout differs (saved streams belong to other ranks)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
