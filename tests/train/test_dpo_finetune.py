"""`scalelm finetune` with finetune.objective=dpo end to end, for a fully finetuned policy (train.init_from scores
the pairs first, beside the shards) and a LoRA policy (its reference the base without adapters): both start at
the reference exactly, learn their preferences, resume bit for bit, and refuse reference log-probs that are not
the ones they trained with."""

import json
import math

import pytest

from scalelm.checkpoint import store
from scalelm.data.preference_shards import write_preference_shards
from scalelm.data.reference import read_reference_manifest
from scalelm.errors import DataError
from scalelm.train.finetune import load_finetune_config
from scalelm.train.log import read_records
from scalelm.train.loop import train
from scalelm.train.score import reference_model, score_command
from tests.helpers.batches import score_run
from tests.helpers.corpus import write_pairs
from tests.helpers.launched import SFT_RUN as RUN
from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import pretrain_run, straight_and_resumed

pytestmark = [pytest.mark.slow]

DPO = ["finetune.objective=dpo", "finetune.dpo.beta=0.5", "optim.lr=1e-2"]
LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=8", "finetune.lora.targets=[qkv,proj,fc1,fc2]", "optim.lr=3e-2"]


@pytest.fixture(scope="module")
def pairs(pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    raw = write_pairs(root / "raw", n=160)
    write_preference_shards([raw], pipeline["tokenizer"], root / "shards", seq_len=128, val_fraction=0.1,
                            workers=1, progress=False)
    return root / "shards"


def dpo_run(pairs, start, run, *extra: str) -> list[str]:
    return [f"data.train={pairs}", f"train.init_from={start}", f"log.dir={run}", "train.eval_every=0", *RUN, *DPO, *extra]


def records(run):
    return [r for r in read_records(run) if "loss" in r]


@pytest.fixture(scope="module")
def full(pairs, sft_start, tmp_path_factory):
    run = tmp_path_factory.mktemp("dpo-full") / "run"
    train(load_finetune_config(None, dpo_run(pairs, sft_start, run, "train.steps=8", "train.eval_every=8")), "finetune")
    return run


def test_a_full_policy_scores_its_reference_first_and_starts_from_it(full, pairs, sft_start):
    events = (full / "events.log").read_text()
    assert "scoring the reference log-probs" in events and "scored " in events and " pairs into " in events
    model = reference_model(load_finetune_config(None, dpo_run(pairs, sft_start, full)))
    manifest = read_reference_manifest(pairs, model["sha256"])
    assert manifest["model"] == model and set(manifest["splits"]) == {"train", "val"}
    ckpt = store.read_manifest(store.resolve(full / "checkpoints"))
    assert ckpt["reference"]["model"] == model and str(pairs) in ckpt["reference"]["manifests"]
    steps = records(full)
    # the policy is the reference at the first step: every log-ratio is zero, the loss log 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["reward_margin"] == pytest.approx(0, abs=1e-5) and steps[0]["pairs"] > 0
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["reward_margin"] > 0


def test_a_lora_policy_starts_from_its_base(pairs, sft_start, tmp_path):
    run = tmp_path / "run"
    train(load_finetune_config(None, dpo_run(pairs, sft_start, run, "train.steps=6", *LORA)), "finetune")
    steps = records(run)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # B starts at zero: adapters on = off
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["reward_accuracy"] > 0.5
    assert "scor" not in (run / "events.log").read_text()  # nothing scored: the base is the reference
    manifest = store.read_manifest(store.resolve(run / "checkpoints"))
    assert manifest["reference"] is None and manifest["base"]
    from scalelm.infer.evaluate import evaluate_checkpoint

    evaluated = evaluate_checkpoint(run / "checkpoints", [str(pairs)], "train", 8)  # against the base, adapters off
    assert evaluated.pairs >= 8 and evaluated.metrics["reward_margin"] > 0


def test_full_dpo_resumes_bit_exact(full, pairs, sft_start, tmp_path):
    # one process: resuming in other layouts is the checkpoint code every run shares (test_checkpoint_resume.py)
    common = dpo_run(pairs, sft_start, tmp_path / "x", "optim.decay_steps=6")
    straight, resumed = straight_and_resumed(common, tmp_path / "x", 6)
    losses = [run_ranks(1, pretrain_run, leg, "finetune")[0] for leg in (straight, resumed)]
    assert len(losses[1]) == 3 and losses[1] == losses[0][3:]  # every bit of every step's loss


def test_reference_log_probs_scored_again_are_refused_on_resume(full, pairs, sft_start, tmp_path):
    cfg = load_finetune_config(None, dpo_run(pairs, sft_start, full, "train.steps=10"))
    where = pairs / "reference" / reference_model(cfg)["sha256"][:16] / "manifest.json"
    saved = where.read_text()
    manifest = json.loads(saved)
    manifest["scored"]["precision"] = "bf16"  # as if scored again another way
    where.write_text(json.dumps(manifest))
    try:
        with pytest.raises(DataError, match="are not those this run trained with"):
            train(cfg, "finetune")
    finally:
        where.write_text(saved)


def test_score_scores_once_and_refuses_lora(pairs, sft_start, full, capsys):
    cfg = load_finetune_config(None, dpo_run(pairs, sft_start, full))
    score_command(cfg, overwrite=False)
    assert "nothing to score" in capsys.readouterr().out
    with pytest.raises(DataError, match="nothing to score"):
        score_command(load_finetune_config(None, dpo_run(pairs, sft_start, full, *LORA)), overwrite=False)


def test_scoring_on_a_pipeline_and_two_data_ranks_gives_the_values_of_one_process(full, pairs, sft_start, tmp_path):
    import shutil

    import numpy as np

    from scalelm.data.shards import SPLITS, read_manifest

    model = reference_model(load_finetune_config(None, dpo_run(pairs, sft_start, full)))["sha256"][:16]
    for name, (world, layout) in {"pp2": (2, ["parallel.pipeline=2"]), "dp2": (2, [])}.items():
        copy = tmp_path / name
        shutil.copytree(pairs, copy, ignore=shutil.ignore_patterns("reference"))
        run_ranks(world, score_run, dpo_run(copy, sft_start, tmp_path / "log", *layout))
        for split in SPLITS:
            for shard in read_manifest(copy, split).shards:
                file = shard.name.removesuffix(".tar") + ".npy"
                ours, theirs = (np.load(root / "reference" / model / file) for root in (copy, pairs))
                np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=f"{name} {split} {file}")


def test_reference_values_not_their_manifest_s_are_refused(full, pairs, sft_start, tmp_path):
    import shutil

    import numpy as np

    from scalelm.data.reference import with_reference
    from scalelm.data.shards import read_manifest

    copy = tmp_path / "pairs"
    shutil.copytree(pairs, copy)
    model = reference_model(load_finetune_config(None, dpo_run(pairs, sft_start, full)))["sha256"]
    file = next((copy / "reference" / model[:16]).glob("train-*.npy"))
    np.save(file, np.load(file) + 1)
    with pytest.raises(DataError, match="not the file its manifest lists"):
        with_reference(read_manifest(copy, "train"), model)


def test_objectives_and_shards_must_agree(pairs, chat, sft_start, tmp_path):
    with pytest.raises(DataError, match="holds preference pairs"):
        train(load_finetune_config(None, dpo_run(pairs, sft_start, tmp_path, "finetune.objective=sft")), "finetune")
    with pytest.raises(DataError, match="holds chat shards, and finetune.objective=dpo"):
        train(load_finetune_config(None, dpo_run(chat["shards"], sft_start, tmp_path)), "finetune")


def test_eval_reports_rewards_against_the_reference(full, pairs, sft_start):
    from scalelm.infer.evaluate import evaluate_checkpoint

    validated = [r for r in read_records(full) if "val_loss" in r][-1]
    assert 0 <= validated["val_reward_accuracy"] <= 1 and "val_perplexity" not in validated
    result = evaluate_checkpoint(full / "checkpoints", [str(pairs)], "val", None)
    assert result.pairs > 0 and 0 <= result.metrics["reward_accuracy"] <= 1
    assert result.metrics["reward_margin"] == pytest.approx(
        result.metrics["reward_chosen"] - result.metrics["reward_rejected"], abs=1e-5)
    assert result.line("val").startswith("reward accuracy ") and 0 <= result.metrics["chosen_likelier"] <= 1
    start = evaluate_checkpoint(sft_start, [str(pairs)], "val", None)  # no reference: its own log-probs alone
    assert start.pairs == result.pairs and start.metrics["reward_accuracy"] == start.metrics["chosen_likelier"]
    assert start.metrics["logps_chosen"] != result.metrics["logps_chosen"]  # trained: the policy moved
    assert "no reference" in start.line("val") and "reward accuracy" not in start.line("val")
