"""Every parallel layout trains like one process: same loss at every step (fp32, CPU, gloo ranks)."""

import pytest
import torch

from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import train_steps

BATCH = ["train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=1", "optim.lr=1e-2"]

LAYOUTS = {
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "tp2xdp2": (4, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "tp2xpp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "pp2xdp2": (4, ["parallel.pipeline=2"]),
    # recomputation changes memory, never the math
    "recompute-selective": (1, ["train.activation_checkpointing=selective"]),
    "recompute-full": (1, ["train.activation_checkpointing=full"]),
    "tp2-recompute-full": (2, ["parallel.tensor=2", "train.activation_checkpointing=full"]),
    "pp2-recompute-full": (2, ["parallel.pipeline=2", "train.activation_checkpointing=full"]),
}


# Layouts that split the model: the first step's whole gradients are compared too (ZeRO-1 keeps
# them whole until the step, so they can be read there).
GRADIENTS_COMPARED = ["tp2", "tp2-sp", "pp2", "tp2xpp2", "pp2xdp2", "tp2xdp2"]


@pytest.fixture(scope="module")
def single():
    (result,) = run_ranks(1, train_steps, BATCH)
    return result


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(single, name):
    world, layout = LAYOUTS[name]
    results = run_ranks(world, train_steps, BATCH + layout)
    assert single["losses"][-1] < single["losses"][0]  # it trains at all
    for rank, result in enumerate(results):
        assert result["losses"] == pytest.approx(single["losses"], abs=1e-5), f"rank {rank}"
        assert result["val"] == pytest.approx(single["val"], abs=1e-5), f"rank {rank}: validation loss"
    if name in GRADIENTS_COMPARED:
        grads = results[0]["grads"]
        assert grads.keys() == single["grads"].keys()
        for key, grad in single["grads"].items():
            torch.testing.assert_close(grads[key], grad, atol=1e-6, rtol=1e-4, msg=key)
