"""Tensor and sequence parallelism give the single-process loss and gradients (fp32, CPU, gloo)."""

import pytest
import torch

from scalelm.model.size import parameter_count
from scalelm.model.spec import padded_vocab_size
from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import LLAMA, VOCAB, forward_backward, tiny_config

GPT3 = []


@pytest.mark.parametrize("arch", [GPT3, LLAMA], ids=["gpt3", "llama"])
@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.tensor=2", "parallel.sequence_parallel=true"]],
                         ids=["tp2", "tp2-sp"])
def test_tensor_parallel_matches_single_process(arch, layout):
    (single,) = run_ranks(1, forward_backward, arch)
    cfg = tiny_config(arch)  # the MFU parameter count is the model's, less the position table
    positions = cfg.model.max_position_embeddings * cfg.model.hidden_size if "model.position_embedding=rope" not in arch else 0
    assert sum(g.numel() for g in single["grads"].values()) == parameter_count(cfg.model, padded_vocab_size(VOCAB)) + positions
    parallel = run_ranks(2, forward_backward, arch + layout)
    assert all(abs(r["loss"] - single["loss"]) < 1e-5 for r in parallel)
    assert parallel[0]["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(parallel[0]["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
