"""DPO trains alike in every layout, for a fully finetuned policy (reference log-probs scored beforehand, handed
in with the batch) and for a LoRA policy (its reference the same model with the adapters off, a forward pass of
the engine's own): the loss and reward figures at each step, the validation loss and the first step's gradients
equal one process (fp32, CPU, gloo ranks), on packed windows of one or two pairs each, with the SFT term on."""

import pytest
import torch

from tests.distributed.ranks import run_ranks
from tests.distributed.workloads import LLAMA, dpo_steps

DPO = ["finetune.objective=dpo", "finetune.dpo.beta=0.5", "finetune.dpo.sft_weight=0.1", "train.seq_len=32",
       "train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=1", "optim.lr=1e-2"]
LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=8", "finetune.lora.targets=[qkv,proj,fc1,fc2]"]
LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "tp2xpp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
}


@pytest.fixture(scope="module")
def single():
    (result,) = run_ranks(1, dpo_steps, DPO + LLAMA, LORA)
    return result


def test_the_figures_are_those_of_pairs(single):
    for policy, result in single.items():
        assert result["metrics"]["pairs"] > 8  # eight windows of one or two pairs
        assert 0 <= result["metrics"]["reward_accuracy"] <= 1
        assert result["metrics"]["reward_margin"] == pytest.approx(
            result["metrics"]["reward_chosen"] - result["metrics"]["reward_rejected"], abs=1e-5)
    assert all(".lora." in key for key in single["lora"]["grads"])
    assert not any(".lora." in key for key in single["full"]["grads"])


@pytest.mark.parametrize("name", LAYOUTS)
def test_dpo_matches_single_process(single, name):
    world, layout = LAYOUTS[name]
    results = run_ranks(world, dpo_steps, DPO + LLAMA + layout, LORA)
    for policy, expected in single.items():
        for rank, ranked in enumerate(results):
            result = ranked[policy]
            assert result["losses"] == pytest.approx(expected["losses"], abs=1e-5), f"{policy}, rank {rank}"
            assert result["val"] == pytest.approx(expected["val"], abs=1e-5), f"{policy}, rank {rank}: validation"
            if result["metrics"]["pairs"] is not None:  # ranks that read the batch (not a middle pipeline stage)
                assert result["metrics"] == pytest.approx(expected["metrics"], abs=1e-5), f"{policy}, rank {rank}"
        if "zero3" not in name:
            for key, grad in expected["grads"].items():
                torch.testing.assert_close(results[0][policy]["grads"][key], grad, atol=1e-6, rtol=1e-4,
                                           msg=lambda m: f"{policy} {key}: {m}")
