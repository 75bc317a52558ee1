"""SFT's batches (packed documents, masked targets) train alike in every layout: the loss at each step,
the validation loss and the first step's gradients equal one process (fp32, CPU, gloo ranks). Full recomputation
of packed batches under the pipeline is checked with LoRA (test_lora_parity.py), which runs the same recompute."""

import pytest
import torch

from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import FINETUNE_LAYOUTS as LAYOUTS
from tests.helpers.workloads import LLAMA, train_steps

BATCH = ["train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=1", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def single():
    (result,) = run_ranks(1, train_steps, BATCH + LLAMA, 3, 0, True, True)
    return result


@pytest.mark.parametrize("name", LAYOUTS)
def test_packed_masked_training_matches_single_process(single, name):
    world, layout = LAYOUTS[name]
    results = run_ranks(world, train_steps, BATCH + LLAMA + layout, 3, 0, True, True)
    assert single["losses"][-1] < single["losses"][0]
    for rank, result in enumerate(results):
        assert result["losses"] == pytest.approx(single["losses"], abs=1e-5), f"rank {rank}"
        assert result["val"] == pytest.approx(single["val"], abs=1e-5), f"rank {rank}: validation loss"
        if result["metrics"]["targets"] is not None:  # ranks that read the batch (not a middle pipeline stage)
            assert result["metrics"] == pytest.approx(single["metrics"], abs=1e-6), f"rank {rank}: validation metrics"
    assert 0 < single["metrics"]["accuracy"] < 1 and single["metrics"]["targets"] > 0
    if "zero3" not in name:
        grads = results[0]["grads"]
        for key, grad in single["grads"].items():
            torch.testing.assert_close(grads[key], grad, atol=1e-6, rtol=1e-4, msg=key)
