"""A reward model as the reward of GRPO (rl.reward_model): scalelm's reward head, trained on preference pairs, runs on
the policy's ranks (here two tensor ranks) beside it, and the rewards it gives are the scores transformers gives the
same completions with the reward model's Hugging Face export; a checkpoint that is not a reward head is refused."""

import pytest
import torch

from scalelm.checkpoint import store
from scalelm.convert.hf import to_hf
from scalelm.data.preference_shards import write_preference_shards
from scalelm.errors import ConfigError
from scalelm.train.finetune import load_finetune_config
from scalelm.train.loop import train
from scalelm.train.preflight import preflight
from tests.helpers.corpus import write_pairs
from tests.helpers.launched import SFT_RUN
from tests.helpers.ranks import run_ranks
from tests.helpers.rl import RL, rl_run

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def reward_model(pipeline, sft_start, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-model")
    write_preference_shards([write_pairs(root / "raw", n=60, seed=5)], pipeline["tokenizer"], root / "pairs",
                            seq_len=128, val_fraction=0.0, workers=1, progress=False)
    train(load_finetune_config(None, [f"data.train={root / 'pairs'}", f"train.init_from={sft_start}",
                                      f"log.dir={root / 'run'}", "train.eval_every=0", "train.steps=3", *SFT_RUN,
                                      "finetune.objective=reward", "finetune.head=classification",
                                      "finetune.num_labels=1", "optim.lr=1e-2"]), "finetune")
    return store.resolve(root / "run" / "checkpoints")


def test_the_rewards_are_the_reward_models_scores_in_transformers(prompts, sft_start, reward_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    found = run_ranks(2, rl_run, [f"data.train={prompts}", f"train.init_from={sft_start}", f"log.dir={run}", *RL,
                                  "rl.reward=[]", f"rl.reward_model={reward_model}", "rl.reward_model_weight=2.0",
                                  "train.steps=1", "parallel.tensor=2"])[0]
    to_hf(reward_model, tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    state = store.read_manifest(store.resolve(run / "checkpoints"))["loader"][0]["rollout"]
    with torch.no_grad():
        scores = [hf(input_ids=torch.tensor([p + c])).logits[0, 0].item()
                  for p, c in zip(state["prompts"], state["completions"])]
    rewards = [2.0 * s for s in scores]
    assert found["records"][0]["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-4)
    assert max(scores) - min(scores) > 1e-3  # the completions are told apart


def test_a_checkpoint_that_is_not_a_reward_head_is_refused(prompts, sft_start, tmp_path):
    with pytest.raises(ConfigError, match=r"^rl.reward_model=.* was trained with finetune.objective=next_token: a "
                                          r"reward model is a reward head \(finetune.objective=reward"):
        preflight(load_finetune_config(None, [f"data.train={prompts}", f"train.init_from={sft_start}",
                                              f"log.dir={tmp_path}", *RL, f"rl.reward_model={sft_start}"]), "finetune", 1)
