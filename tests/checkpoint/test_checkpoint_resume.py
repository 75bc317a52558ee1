"""Checkpoints on real ranks: N steps + resume + N steps is the 2N-step run, bit for bit, in every
layout; and a checkpoint of one layout loads into another with every tensor intact."""

import re

import pytest
import torch
from safetensors import safe_open

from scalelm.checkpoint import store
from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import full_disk_run, pretrain_run, reshard, straight_and_resumed

N = 3
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=32",
        "train.micro_batch_size=2", "train.global_batch_size=8", "train.precision=fp32", "train.eval_every=0",
        "data.num_workers=0", "optim.warmup_steps=1", "optim.lr=1e-2", f"optim.decay_steps={2 * N}", "log.every=1",
        "log.tensorboard=false"]


def base(pipeline, *extra: str) -> list[str]:
    return [f"data.train={pipeline['shards']}", f"data.tokenizer={pipeline['tokenizer']}", *TINY, *extra]


# one process resumes bit for bit in tests/e2e/test_finetune.py (and SIGTERM's resume in test_checkpoint.py)
LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_resume_is_bit_exact(pipeline, tmp_path, name):
    world, layout = LAYOUTS[name]
    # dropout on, so the RNG streams must come back too
    common = base(pipeline, *layout, "model.dropout=0.1", "model.attention_dropout=0.1", f"log.dir={tmp_path / 'x'}")
    straight, resumed = straight_and_resumed(common, tmp_path / "x", 2 * N)
    losses = [run_ranks(world, pretrain_run, leg)[0] for leg in (straight, resumed)]
    assert len(losses[0]) == 2 * N and len(losses[1]) == N
    assert losses[1] == losses[0][N:]  # exactly: every bit of every step's loss
    assert store.committed(tmp_path / "resumed" / "checkpoints")[0].name == f"step-{2 * N:08d}"


def test_a_full_disk_on_one_rank_is_the_same_error_on_every_rank_while_writing_in_the_background(pipeline, tmp_path):
    overrides = base(pipeline, "parallel.tensor=2", f"log.dir={tmp_path}", "train.steps=6", "checkpoint.every=2")
    results = run_ranks(2, full_disk_run, overrides, 1, 4)
    assert results[0]["error"] == results[1]["error"]
    assert re.fullmatch(r"could not save the checkpoint of step 4: rank 1: No space left on device \(.*model-00001"
                        r"\.safetensors\); the previous checkpoint is still the newest", results[0]["error"])
    # training went on during the write, and stopped at the next step once both ranks were done (or at the next save)
    assert results[0]["steps"] in ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6])
    assert [p.name for p in store.committed(tmp_path / "checkpoints")] == ["step-00000002"]
    assert store.resolve(tmp_path / "checkpoints").name == "step-00000002"


def read_all(ckpt) -> dict[str, torch.Tensor]:
    manifest = store.read_manifest(ckpt)
    out = {}
    for file in {e[kind] for e in manifest["tensors"].values() for kind in ("model", "optimizer")}:
        with safe_open(ckpt / file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


RESHARD = {
    "tp2xpp2-to-dp2": ((4, ["parallel.tensor=2", "parallel.pipeline=2"]), (2, [])),
    "tp1-to-tp2": ((1, []), (2, ["parallel.tensor=2"])),
    "pp2-to-pp1": ((2, ["parallel.pipeline=2"]), (1, [])),
    "zero3-dp2-to-zero1-dp1": ((2, ["parallel.zero_stage=3"]), (1, ["parallel.zero_stage=1"])),
}


@pytest.mark.parametrize("name", RESHARD)
def test_checkpoint_loads_into_another_layout(pipeline, tmp_path, name):
    (world_a, layout_a), (world_b, layout_b) = RESHARD[name]
    run_a = base(pipeline, *layout_a, f"log.dir={tmp_path / 'a'}", f"train.steps={N}")
    run_ranks(world_a, pretrain_run, run_a)
    saved = store.resolve(tmp_path / "a" / "checkpoints")
    run_ranks(world_b, reshard, base(pipeline, *layout_b, f"log.dir={tmp_path / 'b'}"), str(saved), str(tmp_path / "b"))
    again = store.resolve(tmp_path / "b")
    before, after = read_all(saved), read_all(again)
    assert before.keys() == after.keys() and any(k.startswith("exp_avg_sq/") for k in before)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key  # weights and both AdamW moments, bit for bit
    assert any(t.abs().sum() > 0 for k, t in before.items() if k.startswith("exp_avg/"))
    a, b = store.read_manifest(saved), store.read_manifest(again)
    assert b["counters"]["adam_steps"] == a["counters"]["adam_steps"] == N
    assert b["counters"]["schedule_step"] == a["counters"]["schedule_step"]


@pytest.mark.parametrize("world, layout", [(1, []), (2, ["parallel.zero_stage=3"])], ids=["single", "dp2-zero3"])
def test_a_frozen_weight_is_saved_and_loaded_without_moments(tmp_path, world, layout):
    from tests.helpers.workloads import frozen_weight_round_trip

    result = run_ranks(world, frozen_weight_round_trip, layout + ["train.global_batch_size=4"], str(tmp_path / "ckpt"))[0]
    assert result["entry"]["states"] == ["param"] and "optimizer" not in result["entry"]
    assert torch.equal(result["loaded"], result["saved"]) and result["saved"][0] == 0.5
