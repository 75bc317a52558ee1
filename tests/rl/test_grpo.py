"""`scalelm finetune` with a policy-gradient objective end to end: the tiny model samples completions of prompt
shards, a reward scores them, and GRPO moves the policy; the trainer's log-probs are the sampler's before the first
update, the reward rises on a toy task, a run stopped mid-rollout resumes bit for bit, and bad inputs stop in one
line."""

import base64
import math

import pytest

from scalelm.errors import ConfigError, TrainingError
from scalelm.train.finetune import load_finetune_config
from scalelm.train.log import read_records
from scalelm.train.loop import train
from scalelm.train.plot import plot_run
from tests.helpers.ranks import run_ranks
from tests.helpers.rl import RL, rl_run

pytestmark = [pytest.mark.slow]


def run_of(prompts, start, run, *extra: str) -> list[str]:
    return [f"data.train={prompts}", f"train.init_from={start}", f"log.dir={run}", *RL, *extra]


def test_the_reward_rises_and_the_trainer_reads_the_samplers_log_probs(prompts, sft_start, tmp_path):
    """letter_e's mean over a rollout of 32 completions of 8 tokens is about 0.06 at the start, and a rollout's mean
    moves by chance about sqrt(0.06 x 0.94 / 256) = 0.015 (fewer independent letters than that: say 0.03). After 16
    steps it must beat the first rollout's by 0.1, more than 3 such deviations."""
    run = tmp_path / "run"
    train(load_finetune_config(None, run_of(prompts, sft_start, run, "train.steps=16", "train.global_batch_size=32",
                                            "train.micro_batch_size=16", "rl.group_size=8")), "finetune")
    records = [r for r in read_records(run) if "loss" in r]
    assert len(records) == 16 and all("reward_mean" in r for r in records)
    first, last = records[0]["reward_mean"], records[-1]["reward_mean"]
    assert last > first + 0.1, [round(r["reward_mean"], 3) for r in records]
    # one step per rollout: every step is a rollout's first update, where the trainer's log-probs are the sampler's
    assert max(r["logprob_gap"] for r in records) <= 1e-6
    assert all(r["sampling_s"] > 0 and r["completion_tokens"] > 0 and 0 < r["entropy"] < 7 for r in records)
    assert all(r["data_s"] >= r["sampling_s"] + r["scoring_s"] for r in records)  # the step's time split
    assert plot_run(run, tmp_path / "rl.png").stat().st_size > 10_000  # with its reward panel


def test_several_updates_per_rollout_move_away_from_the_sampler(prompts, sft_start, tmp_path):
    """rl.ppo_epochs=2 over rl.steps_per_rollout=2 minibatches: four steps per rollout, the first on-policy (gap 0),
    the later ones off it by what the first updates moved; the rollout's reward is reported on each."""
    run = tmp_path / "run"
    train(load_finetune_config(None, run_of(prompts, sft_start, run, "train.steps=4", "rl.steps_per_rollout=2",
                                            "rl.ppo_epochs=2")), "finetune")
    records = [r for r in read_records(run) if "loss" in r]
    assert records[0]["logprob_gap"] <= 1e-6 and records[2]["logprob_gap"] > 1e-4
    assert records[0]["sampling_s"] > 0 and all(r["sampling_s"] == 0 for r in records[1:])
    assert len({r["reward_mean"] for r in records}) == 1


def test_a_run_stopped_mid_rollout_resumes_bit_for_bit(prompts, sft_start, tmp_path):
    """Two minibatches per rollout on two data-parallel ranks: the checkpoint after step 3 holds a rollout half used
    (in rank 0's state), which the resumed run must finish with the same rows on both ranks (its completions and
    sampling log-probs come from the checkpoint)."""
    common = run_of(prompts, sft_start, tmp_path / "x", "rl.steps_per_rollout=2", "parallel.zero_stage=1")
    straight = run_ranks(2, rl_run, [o.replace("/x", "/straight") for o in common] + ["train.steps=6",
                                                                                       "checkpoint.every=3"])[0]
    mid = tmp_path / "straight" / "checkpoints" / "step-00000003"
    resumed = run_ranks(2, rl_run, [o.replace("/x", "/resumed") for o in common] + ["train.steps=6",
                                                                                     f"train.resume={mid}"])[0]
    assert [r["loss"] for r in resumed["records"]] == [r["loss"] for r in straight["records"]][3:]
    assert [r["reward_mean"] for r in resumed["records"]] == [r["reward_mean"] for r in straight["records"]][3:]
    assert resumed["completions"] == straight["completions"]
    assert all((resumed["weights"][k] == w).all() for k, w in straight["weights"].items())


@pytest.mark.parametrize("objective", ["grpo", "rloo"])
def test_a_kl_to_the_start_reads_zero_until_the_policy_moves(prompts, sft_start, tmp_path, objective):
    """Full finetuning: the reference is train.init_from in a second engine (grpo: k3 per token in the loss; rloo: the
    sampling log-probs against it, off the rewards). The first rollout is sampled from the start itself."""
    run = tmp_path / "run"
    train(load_finetune_config(None, run_of(prompts, sft_start, run, "train.steps=3", f"finetune.objective={objective}",
                                            "rl.kl_coef=0.1")), "finetune")
    records = [r for r in read_records(run) if "loss" in r]
    assert abs(records[0]["kl"]) <= 1e-6 and abs(records[2]["kl"]) > 1e-5


def test_dapo_drops_groups_of_equal_rewards_and_samples_more(prompts, sft_start, tmp_path):
    """DAPO's dynamic sampling: half the prompts reward every completion alike (flat_below_20), so their groups are
    dropped and replaced; every group of the rollout trained on has completions that differ in advantage. The prompt
    order and the sampling are seeded, so what is drawn is the same every run."""
    import numpy as np

    from scalelm.checkpoint import store

    run = tmp_path / "run"
    train(load_finetune_config(None, run_of(prompts, sft_start, run, "train.steps=3", "finetune.objective=dapo",
                                            "rl.reward=tests.helpers.rewards:flat_below_20", "rl.max_sampling_rounds=8",
                                            "rl.clip_high=0.28")), "finetune")
    records = [r for r in read_records(run) if "loss" in r]
    assert sum(r["groups_dropped"] for r in records) > 0
    rollout = store.read_manifest(store.resolve(run / "checkpoints"))["loader"][0]["rollout"]
    advantages = np.frombuffer(base64.b64decode(rollout["advantages"]), np.float32).reshape(-1, 4)
    assert (np.abs(advantages).max(axis=1) > 0).all()


def test_failing_rewards_are_counted_and_too_many_stop_the_run(prompts, sft_start, tmp_path):
    run = tmp_path / "counted"
    train(load_finetune_config(None, run_of(prompts, sft_start, run, "train.steps=2", "train.global_batch_size=16",
                                            "rl.reward=tests.helpers.rewards:nan_for_some", "rl.max_reward_failures=0.9")),
          "finetune")
    records = [r for r in read_records(run) if "loss" in r]
    assert all(r["reward_failures"] > 0 and math.isfinite(r["loss"]) for r in records)
    with pytest.raises(TrainingError, match=r"^the reward failed for 8 of 8 completions of rollout 1, more than "
                                            r"rl.max_reward_failures=0.1; the first, completion 0: "
                                            r"tests.helpers.rewards:always_fails: KeyError: 'no such entry'$"):
        train(load_finetune_config(None, run_of(prompts, sft_start, tmp_path / "stops", "train.steps=2",
                                                "rl.reward=tests.helpers.rewards:always_fails")), "finetune")


@pytest.mark.parametrize("extra,message", [
    (["rl.reward=no_such_module:score"], r"^rl.reward=no_such_module:score: cannot import no_such_module "
                                         r"\(ModuleNotFoundError: .*working directory"),
    (["rl.reward=tests.helpers.rewards:nothing"], r"tests.helpers.rewards has no function 'nothing'"),
    (["rl.reward=exact_matc"], r"did you mean exact_match\?"),
    (["rl.group_size=1", "train.global_batch_size=4"], r"^rl.group_size=1: grpo compares the completions of one prompt"),
    (["rl.max_new_tokens=28"], r"holds a prompt of \d+ tokens, and train.seq_len - rl.max_new_tokens = 32 - 28 = 4: raise train.seq_len"),
    (["rl.group_size=3"], r"8 completions, which must be whole groups of rl.group_size=3"),
])
def test_bad_inputs_stop_in_one_line(prompts, sft_start, tmp_path, extra, message):
    from scalelm.train.preflight import preflight

    with pytest.raises(ConfigError, match=message) as e:
        preflight(load_finetune_config(None, run_of(prompts, sft_start, tmp_path, *extra)), "finetune", 1)
    assert "\n" not in str(e.value)


def test_prompt_shards_of_another_tokenizer_are_refused(pipeline, sft_start, tmp_path):
    from scalelm.data.prompt_shards import write_prompt_shards
    from scalelm.data.tokenizer import train_tokenizer
    from scalelm.errors import DataError
    from scalelm.train.preflight import preflight
    from tests.helpers.rl import write_prompts

    train_tokenizer([pipeline["docs"]], tmp_path / "other.model", vocab_size=350, workers=1)
    write_prompt_shards([write_prompts(tmp_path / "raw")], tmp_path / "other.model", tmp_path / "shards",
                        val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match=r"shards was made with another tokenizer .* than data.tokenizer"):
        preflight(load_finetune_config(None, run_of(tmp_path / "shards", sft_start, tmp_path / "run")), "finetune", 1)


def test_text_shards_are_not_prompts(pipeline, sft_start, tmp_path):
    from scalelm.errors import DataError
    from scalelm.train.preflight import preflight

    with pytest.raises(DataError, match=r"holds text shards, and finetune.objective=grpo trains on prompt shards"):
        preflight(load_finetune_config(None, run_of(pipeline["shards"], sft_start, tmp_path)), "finetune", 1)
