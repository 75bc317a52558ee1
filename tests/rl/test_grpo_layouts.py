"""GRPO on every layout (ZeRO-3: its weights gathered for sampling) equals one process: the same completions (the
decoder samples on the training layout, each completion from its own seeded generator), the same rewards, and after
two steps (the second off-policy: rl.ppo_epochs=2) the same losses and weights to 1e-5 in fp32, on spawned gloo ranks.
With a KL too: LoRA's to its base (the adapters off) on two tensor ranks, a full finetune's to train.init_from (a
second engine) on a pipeline, RLOO's off the rewards (each data-parallel rank scoring its share) on two data-parallel
ranks."""

import pytest
import torch

from scalelm.convert.source import read_model
from tests.helpers.ranks import run_ranks
from tests.helpers.rl import RL, rl_run

pytestmark = [pytest.mark.slow]

LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=8", "finetune.lora.targets=[qkv,proj,fc1,fc2]", "rl.kl_coef=0.05"]
# what one process runs too: GRPO; LoRA with a KL to its base; a full finetune with a KL to train.init_from (a
# second engine); RLOO with its KL off the rewards
VARIANTS = {"grpo": [], "lora": LORA, "kl": ["rl.kl_coef=0.05"], "rloo": ["finetune.objective=rloo", "rl.kl_coef=0.05"]}
LAYOUTS = {"tp2": (2, ["parallel.tensor=2"], "grpo"), "pp2": (2, ["parallel.pipeline=2"], "grpo"),
           "dp2": (2, ["parallel.zero_stage=1"], "grpo"), "dp2-zero2": (2, ["parallel.zero_stage=2"], "grpo"),
           "dp2-zero3": (2, ["parallel.zero_stage=3"], "grpo"), "lora-tp2": (2, ["parallel.tensor=2"], "lora"),
           "kl-pp2": (2, ["parallel.pipeline=2"], "kl"), "rloo-kl-dp2": (2, ["parallel.zero_stage=1"], "rloo")}


@pytest.fixture(scope="module")
def common(prompts, sft_start, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-layouts")
    return [f"data.train={prompts}", f"train.init_from={sft_start}", *RL, "train.steps=2", "rl.ppo_epochs=2",
            # NOTE: AdamW divides by the root of the second moment, so an element whose gradient is float noise (1e-9)
            # moves by up to lr; an epsilon of 1e-4 keeps such elements still, and the weights compare to 1e-5
            "optim.eps=1e-4"], root


@pytest.fixture(scope="module")
def alone(common):
    overrides, root = common
    return {name: rl_run(overrides + [f"log.dir={root / ('alone-' + name)}", *extra]) for name, extra in VARIANTS.items()}


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_layout_equals_one_process(name, common, alone, sft_start):
    overrides, root = common
    world, layout, variant = LAYOUTS[name]
    found = run_ranks(world, rl_run, overrides + [f"log.dir={root / name}", *layout, *VARIANTS[variant]])[0]
    expected = alone[variant]
    assert found["completions"] == expected["completions"]
    for ours, theirs in zip(found["records"], expected["records"], strict=True):
        assert ours["reward_mean"] == theirs["reward_mean"] and ours["completion_tokens"] == theirs["completion_tokens"]
        for key in ("loss", "logprob_gap", "entropy", "kl"):
            assert ours.get(key) == pytest.approx(theirs.get(key), abs=1e-5), key
    assert expected["records"][1]["logprob_gap"] > 1e-4  # the second step is off-policy: the ratio is tested
    for key, weight in expected["weights"].items():
        torch.testing.assert_close(found["weights"][key], weight, atol=1e-5, rtol=0, msg=lambda m: key + m)
    start = read_model(sft_start, verify=False).weights
    assert max((expected["weights"][k] - w).abs().max().item() for k, w in start.items()) > 1e-4  # the steps moved it
