"""A reward model (finetune.objective=reward, a classification head with one output) end to end: trained from a
language model on preference pairs, evaluated, and exported as GPT2ForSequenceClassification /
LlamaForSequenceClassification whose scores are scalelm's; what it cannot be is refused."""

import pytest
import torch

from scalelm.checkpoint import store
from scalelm.convert import parity
from scalelm.convert.gguf import to_gguf
from scalelm.convert.hf import to_hf, write_hf_folder
from scalelm.convert.source import ScalelmModel
from scalelm.data.chat import ChatEncoder
from scalelm.data.preference_shards import write_preference_shards
from scalelm.data.preferences import read_pairs
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import ConfigError, ConversionError
from scalelm.infer.evaluate import evaluate_checkpoint
from scalelm.model.gpt import GPT
from scalelm.model.spec import layer_spec, transformer_config
from scalelm.parallel.topology import single_process
from scalelm.train.finetune import load_finetune_config
from scalelm.train.log import read_records
from scalelm.train.loop import train
from tests.helpers.corpus import write_pairs
from tests.helpers.launched import SFT_RUN as RUN
from tests.helpers.workloads import LLAMA, VOCAB, tiny_config

pytestmark = [pytest.mark.slow]

REWARD = ["finetune.objective=reward", "finetune.head=classification", "finetune.num_labels=1", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def reward(pipeline, sft_start, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    raw = write_pairs(root / "raw", n=120, seed=3)
    write_preference_shards([raw], pipeline["tokenizer"], root / "pairs", seq_len=128, val_fraction=0.0, workers=1,
                            progress=False)
    run = root / "run"
    train(load_finetune_config(None, [f"data.train={root / 'pairs'}", f"train.init_from={sft_start}", f"log.dir={run}",
                                      "train.eval_every=0", "train.steps=10", *RUN, *REWARD]), "finetune")
    return {"raw": raw, "pairs": root / "pairs", "run": run, "ckpt": store.resolve(run / "checkpoints")}


def test_a_reward_model_learns_to_prefer_the_chosen_reply(reward):
    steps = [r for r in read_records(reward["run"]) if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[0]["pairs"] > 0
    result = evaluate_checkpoint(reward["ckpt"], [str(reward["pairs"])], "train", None, ["train.micro_batch_size=1"])
    assert result.line("train").startswith("accuracy ") and result.metrics["accuracy"] > 0.6
    assert result.metrics["margin"] == pytest.approx(result.metrics["score_chosen"] - result.metrics["score_rejected"],
                                                     abs=1e-5)
    reward["evaluated"] = result


def test_the_export_scores_pairs_as_scalelm_does(reward, pipeline, tmp_path):
    from transformers import AutoModelForSequenceClassification

    report = to_hf(reward["ckpt"], tmp_path / "hf")
    assert report["parity"]["max_abs_diff"] <= 1e-4 and "ForSequenceClassification" in report["parity"]["what"]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.num_labels == 1
    encoder = ChatEncoder(load_tokenizer(pipeline["tokenizer"]))
    wins, pairs = 0, 0
    with torch.no_grad():
        for _, pair, _ in read_pairs([reward["raw"]]):
            sides = [encoder.encode_reply(pair[0], reply)[0] for reply in pair[1:]]
            if sum(len(s) for s in sides) > 128:
                continue  # dropped when sharded
            chosen, rejected = (hf(input_ids=torch.as_tensor(s)[None]).logits[0, 0].item() for s in sides)
            wins, pairs = wins + (chosen > rejected), pairs + 1
    evaluated = reward.get("evaluated") or evaluate_checkpoint(reward["ckpt"], [str(reward["pairs"])], "train", None,
                                                                ["train.micro_batch_size=1"])
    assert pairs == evaluated.pairs and wins / pairs == pytest.approx(evaluated.metrics["accuracy"], abs=1e-9)


@pytest.mark.parametrize("architecture", [[], LLAMA], ids=["gpt2", "llama"])
def test_a_score_head_exports_as_sequence_classification(architecture, tmp_path):
    cfg = tiny_config(architecture)
    cfg.model.vocab_size = VOCAB
    with single_process():
        gpt = GPT(cfg.model, transformer_config(cfg.model, cfg.parallel, on_gpu=False), layer_spec(on_gpu=False), VOCAB,
                  seed=0, num_labels=3)
        weights = {k: v.clone() for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    write_hf_folder(ScalelmModel(cfg.model, weights, None, "a test model"), tmp_path)
    report = parity.check(cfg.model, weights, tmp_path, 1e-4)
    assert report["what"] == ("LlamaForSequenceClassification" if architecture else "GPT2ForSequenceClassification") + " (fp32)"


def test_what_a_reward_model_cannot_be_is_refused(reward, tmp_path):
    with pytest.raises(ConversionError, match="has a classification head"):
        to_gguf(reward["ckpt"], tmp_path / "x.gguf")
    from scalelm.generation.sampling import Sampling
    from scalelm.infer.generate_hf import generate

    with pytest.raises(ConversionError, match="is a classification model"):
        generate(reward["ckpt"], "hi", Sampling(), stream=False)
    from scalelm.infer.generate import Prompt, generate_checkpoint

    with pytest.raises(ConfigError, match="is not a causal language model .trained with reward.: it scores text"):
        generate_checkpoint(reward["ckpt"], [Prompt(text="hi")], Sampling())
    with pytest.raises(ConfigError, match="set finetune.head=classification and finetune.num_labels=1"):
        load_finetune_config(None, [f"train.init_from={reward['ckpt']}", "train.seq_len=128", "finetune.objective=reward"])
