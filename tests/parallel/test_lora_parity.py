"""LoRA trains alike in every layout: with the base frozen and adapters on the fused QKV, the attention output
and both MLP linears (SwiGLU's fused gate and up among them), the loss at each step, the first step's adapter
gradients and the trained adapters equal one process (fp32, CPU, gloo ranks), and no frozen weight moves."""

import pytest
import torch

from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import FINETUNE_LAYOUTS, LLAMA, train_steps

LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=8",
        "finetune.lora.targets=[qkv,proj,fc1,fc2]", "optim.weight_decay=0.1", "optim.lr=5e-2"]
BATCH = ["train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=1", "optim.lr=1e-2"]
LAYOUTS = {
    **FINETUNE_LAYOUTS,
    # the first block's input comes from the frozen embedding: megatron's reentrant checkpoint must still train
    "pp2-recompute-full": (2, ["parallel.pipeline=2", "train.activation_checkpointing=full"]),
}
OBJECTIVES = {"sft": (True, True), "pretrain": (False, False)}  # (masked, packed)


@pytest.fixture(scope="module")
def single():
    return {name: run_ranks(1, train_steps, BATCH + LLAMA + LORA, 3, 0, *flags)[0] for name, flags in OBJECTIVES.items()}


def test_only_the_adapters_train(single):
    for result in single.values():
        assert result["losses"][-1] < result["losses"][0]
        assert all(".lora." in name for name in result["grads"])
        assert {n.rsplit(".lora.", 1)[0] for n in result["grads"]} == {
            f"blocks.{i}.layer.{m}" for i in range(2) for m in
            ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}
        assert all(g.abs().sum() > 0 for g in result["grads"].values())  # A's too: B does not start at zero here


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_lora_training_matches_single_process(single, name, objective):
    if objective == "pretrain" and name != "tp2-sp":
        pytest.skip("the pretraining objective is checked on the layout that splits the adapters most (TP with SP)")
    world, layout = LAYOUTS[name]
    expected = single[objective]
    results = run_ranks(world, train_steps, BATCH + LLAMA + LORA + layout, 3, 0, *OBJECTIVES[objective])
    for rank, result in enumerate(results):
        assert result["losses"] == pytest.approx(expected["losses"], abs=1e-5), f"rank {rank}"
    weights = results[0]["weights"]
    assert weights.keys() == expected["weights"].keys()
    for key, value in expected["weights"].items():
        if ".lora." in key:
            # NOTE: AdamW divides by the root of the second moment, so an element whose gradients are about zero
            # (1e-9) moves by up to lr on float noise alone; a misplaced split moves many by lr x steps
            torch.testing.assert_close(weights[key], value, atol=1e-3, rtol=0, msg=lambda m: key + m)
        else:  # frozen: bit for bit the single process's, which is the initialisation
            assert torch.equal(weights[key], value), key
    if "zero3" not in name:
        for key, grad in expected["grads"].items():
            torch.testing.assert_close(results[0]["grads"][key], grad, atol=1e-6, rtol=1e-4, msg=key)
