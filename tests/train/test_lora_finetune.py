"""`scalelm finetune` with finetune.lora end to end: a small checkpoint that names its base, resumed bit for bit
and resharded, evaluated and generated from directly, merged into a Hugging Face model whose logits are
scalelm's, and refusing a base that is not its own."""

import json
import shutil

import pytest
import torch

from scalelm.checkpoint import store
from scalelm.checkpoint.base import base_of
from scalelm.config import load_config
from scalelm.errors import CheckpointError, ConfigError
from scalelm.train.finetune import load_finetune_config
from scalelm.train.loop import train
from tests.helpers.launched import SFT_RUN as RUN
from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import evaluate_run, pretrain_run, straight_and_resumed

pytestmark = [pytest.mark.slow]

LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=8", "finetune.lora.targets=[qkv,proj,fc1,fc2]", "optim.lr=2e-2"]


def lora_run(chat, start, run, *extra: str) -> list[str]:
    return [f"data.train={chat['shards']}", f"train.init_from={start}", f"log.dir={run}", "train.eval_every=0",
            *RUN, *LORA, *extra]


@pytest.fixture(scope="module")
def trained_lora(chat, sft_start, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    last = train(load_finetune_config(None, lora_run(chat, sft_start, run, "train.steps=6")), "finetune")
    return {"run": run, "ckpt": store.resolve(run / "checkpoints"), "last": last}


def test_a_lora_checkpoint_holds_the_adapters_and_names_its_base(trained_lora, sft_start):
    ckpt = trained_lora["ckpt"]
    manifest = store.read_manifest(ckpt)
    assert manifest["base"] == base_of(sft_start)  # by path and by the SHA-256 of the base's manifest
    assert manifest["tensors"] and all(".lora." in name for name in manifest["tensors"])
    assert all(entry["states"] == ["param", "exp_avg", "exp_avg_sq"] for entry in manifest["tensors"].values())
    base = store.read_manifest(store.resolve(sft_start))
    adapters = sum(f["bytes"] for name, f in manifest["files"].items() if name.startswith("model"))
    weights = sum(f["bytes"] for name, f in base["files"].items() if name.startswith("model"))
    assert adapters < weights / 10
    events = (trained_lora["run"] / "events.log").read_text()
    assert "adapters freshly initialised" in events and "trainable" in events


def test_lora_resumes_bit_exact_and_reshards(chat, sft_start, tmp_path):
    common = lora_run(chat, sft_start, tmp_path / "x", "model.dropout=0.1", "finetune.lora.dropout=0.1",
                      "optim.decay_steps=6")
    straight, resumed = straight_and_resumed(common, tmp_path / "x", 6)
    losses = [run_ranks(2, pretrain_run, leg + ["parallel.tensor=2"], "finetune")[0] for leg in (straight, resumed)]
    assert len(losses[1]) == 3 and losses[1] == losses[0][3:]  # every bit of every step's loss
    assert losses[0][-1] < losses[0][0]
    # the tensor-parallel checkpoint goes on in one process
    (resharded,) = run_ranks(1, pretrain_run, resumed[:-2] + ["train.steps=7"], "finetune")  # its own newest
    assert len(resharded) == 4 and resharded[:3] == losses[0][3:]
    assert "layout changed (tensor x pipeline x data 2x1x1 -> 1x1x1)" in (tmp_path / "resumed" / "events.log").read_text()


def test_eval_generate_and_the_merged_export_take_a_lora_checkpoint(trained_lora, chat, tmp_path):
    from transformers import AutoModelForCausalLM

    from scalelm.cli import main
    from scalelm.convert.parity import probe_tokens, scalelm_logits
    from scalelm.convert.source import read_lora
    from scalelm.generation.sampling import Sampling
    from scalelm.infer.generate_hf import generate
    from scalelm.model.lora import merge

    ckpt = trained_lora["ckpt"]
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    # the adapter alone, for peft and llama.cpp, each checked against scalelm in its consumer's form
    assert main(["convert", "to-peft", str(ckpt), str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4
    assert main(["convert", "to-gguf", str(ckpt), str(tmp_path / "adapter.gguf"), "--adapter"]) == 0
    base, adapters, settings = read_lora(ckpt)
    assert settings.rank == 4 and all(a.abs().sum() > 0 for a in adapters.values())
    tokens = probe_tokens(base.model.vocab_size, 32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    merged = scalelm_logits(base.model, merge(base.weights, adapters, settings), tokens)
    assert (hf(input_ids=tokens).logits - merged).abs().max() <= 1e-4
    assert (scalelm_logits(base.model, base.weights, tokens) - merged).abs().max() > 1e-3  # the adapters matter

    (ours,) = [r for r in run_ranks(2, evaluate_run, ckpt, [str(chat["shards"])], 8, ["parallel.tensor=2"]) if r]
    from scalelm.infer.evaluate import evaluate_hf

    theirs = evaluate_hf(tmp_path / "hf", [str(chat["shards"])], "val", 128, 4, 8)
    assert ours.loss == pytest.approx(theirs.loss, abs=1e-3) and ours.targets == theirs.targets
    # scalelm's decoder runs the adapters in the forward pass, unmerged; transformers the merged export
    from scalelm.infer.generate import Prompt, generate_checkpoint

    greedy = Sampling(max_new_tokens=4, temperature=0)
    (answer,) = generate_checkpoint(ckpt, [Prompt(text="Kalo mi ren?")], greedy, chat=True)
    assert answer["text"] == generate(tmp_path / "hf", "Kalo mi ren?", greedy, chat=True, stream=False)


def test_a_base_that_is_not_its_own_is_refused(trained_lora, chat, sft_start, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(store.resolve(sft_start), other)
    manifest = json.loads((other / store.MANIFEST).read_text())
    manifest["step"] += 1  # other weights, as far as the hash can tell
    (other / store.MANIFEST).write_text(json.dumps(manifest))
    run = tmp_path / "run"
    shutil.copytree(trained_lora["run"] / "checkpoints", run / "checkpoints")
    with pytest.raises(CheckpointError, match="is not the base .* was trained on"):
        train(load_finetune_config(None, lora_run(chat, other, run, "train.steps=7")), "finetune")
    moved = tmp_path / "moved"
    shutil.copytree(trained_lora["ckpt"], moved)
    manifest = json.loads((moved / store.MANIFEST).read_text())
    manifest["base"]["path"] = str(tmp_path / "gone")
    (moved / store.MANIFEST).write_text(json.dumps(manifest))
    from scalelm.convert.source import read_model

    with pytest.raises(ConfigError, match="finetune.lora.rank=100 must be from 1 to 64"):  # the start's model, 64 wide
        load_finetune_config(None, lora_run(chat, sft_start, tmp_path / "r", "finetune.lora.rank=100"))
    with pytest.raises(ConfigError, match="finetune.lora adapts a trained model, and train.init_from is not set"):
        train(load_config(None, ["finetune.lora.rank=4", f"log.dir={tmp_path / 'p'}"]), "pretrain")
    with pytest.raises(CheckpointError, match="give its path with --base PATH"):
        read_model(moved, verify=False)
    assert read_model(moved, verify=False, base=sft_start).weights  # found where it is said to be
