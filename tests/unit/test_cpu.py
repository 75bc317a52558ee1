"""The CPU redirection still covers every CUDA call on the megatron-core path scalelm runs.

The distributed parity tests run that path on CPU ranks, so a call the redirection misses fails
them. This test fails earlier and names the call: it reads the megatron-core files scalelm's layers
execute, and every torch.cuda name or device="cuda" literal in them must be either redirected by
scalelm.parallel.cpu or listed below as off the CPU path, with the reason. A megatron-core upgrade
that adds one fails here until someone looks at it.
"""

import re
from pathlib import Path

import megatron.core

from scalelm.parallel.cpu import REDIRECTED

ON_OUR_PATH = [
    "tensor_parallel/layers.py", "tensor_parallel/mappings.py", "tensor_parallel/random.py",
    "tensor_parallel/cross_entropy.py", "tensor_parallel/utils.py", "transformer/transformer_layer.py",
    "transformer/attention.py", "transformer/mlp.py", "transformer/module.py",
    "models/common/embeddings/rotary_pos_embedding.py", "parallel_state.py",
]
OFF_THE_CPU_PATH = {
    "torch.cuda.amp.custom_fwd": "autocast decorators; on a CPU they only wrap the function",
    "torch.cuda.amp.custom_bwd": "autocast decorators; on a CPU they only wrap the function",
    "torch.cuda.CUDAGraph": "CUDA-graph-safe RNG, only with use_cudagraphable_rng",
    "torch.cuda.default_generators": "CUDA-graph-safe RNG, only with use_cudagraphable_rng",
    "torch.cuda.OutOfMemoryError": "caught in an except clause, never raised on a CPU",
    "torch.cuda.empty_cache": "only after an out-of-memory error",
    "torch.cuda.BFloat": "Float16Module's type checks, for GPU half precision only",
    "torch.cuda.FloatTensor": "Float16Module's type checks, for GPU half precision only",
    "torch.cuda.HalfTensor": "Float16Module's type checks, for GPU half precision only",
    "torch.cuda.synchronize": "timers and NCCL set-up, not used with gloo",
}


def cuda_uses() -> dict[str, set[str]]:
    root = Path(megatron.core.__file__).parent
    found: dict[str, set[str]] = {}
    for name in ON_OUR_PATH:
        text = (root / name).read_text()
        for use in re.findall(r"torch\.cuda\.[A-Za-z_]+(?:\.[A-Za-z_]+)?", text):
            use = use if use.startswith("torch.cuda.random.") or use.startswith("torch.cuda.amp.") else \
                ".".join(use.split(".")[:3])
            found.setdefault(use, set()).add(name)
        for _ in re.findall(r"""device\s*=\s*["']cuda["']|\.cuda\(\)""", text):
            found.setdefault('device="cuda"', set()).add(name)
    return found


def test_every_cuda_call_on_our_path_is_redirected_or_known_to_be_off_it():
    redirected = {name for name in REDIRECTED if name.startswith("torch.cuda.")}
    unexplained = {use: files for use, files in cuda_uses().items()
                   if use not in redirected and use not in OFF_THE_CPU_PATH}
    assert not unexplained, (
        f"megatron-core {megatron.core.__version__} calls CUDA where scalelm runs it on CPU: {unexplained}; "
        f"redirect it in scalelm/parallel/cpu.py or, if it is off the CPU path, explain it in OFF_THE_CPU_PATH")


def test_megatron_wrappers_we_replace_still_exist():
    import megatron.core.tensor_parallel.random as megatron_random

    for name in REDIRECTED:
        if name.startswith("megatron."):
            assert hasattr(megatron_random, name.rsplit(".", 1)[1]), f"{name} is gone: update scalelm/parallel/cpu.py"
