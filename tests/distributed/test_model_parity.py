"""Tensor and sequence parallelism give the single-process loss and gradients (fp32, CPU, gloo)."""

import pytest
import torch

from tests.distributed.ranks import run_ranks
from tests.distributed.workloads import forward_backward

GPT3 = []
LLAMA = ["model.position_embedding=rope", "model.normalization=rmsnorm", "model.activation=swiglu",
         "model.num_kv_heads=2", "model.tie_embeddings=false", "model.bias=false"]


@pytest.mark.parametrize("arch", [GPT3, LLAMA], ids=["gpt3", "llama"])
@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.tensor=2", "parallel.sequence_parallel=true"]],
                         ids=["tp2", "tp2-sp"])
def test_tensor_parallel_matches_single_process(arch, layout):
    (single,) = run_ranks(1, forward_backward, arch)
    parallel = run_ranks(2, forward_backward, arch + layout)
    assert all(abs(r["loss"] - single["loss"]) < 1e-5 for r in parallel)
    assert parallel[0]["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(parallel[0]["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
