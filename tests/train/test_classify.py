"""A text classifier (finetune.objective=classify) end to end: labelled texts sharded, a language model finetuned
with a classification head, held-out accuracy well above chance with its macro-F1 and confusion matrix, and the
export a LlamaForSequenceClassification / GPT2ForSequenceClassification that classifies as scalelm does."""

import json
import re
import subprocess
import sys

import pytest
import torch

from scalelm.checkpoint import store
from scalelm.convert.hf import to_hf
from scalelm.data.labelled_shards import read_labelled, write_labelled_shards
from scalelm.data.shards import is_val
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import DataError
from scalelm.infer.evaluate import evaluate_checkpoint
from scalelm.train.finetune import load_finetune_config
from scalelm.train.loop import train
from tests.helpers.corpus import write_labelled
from tests.helpers.launched import SFT_RUN as RUN

pytestmark = [pytest.mark.slow]

CLASSIFY = ["finetune.objective=classify", "finetune.head=classification", "finetune.num_labels=3", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def classifier(pipeline, sft_start, tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    raw = write_labelled(root / "raw", n=600)
    write_labelled_shards([raw], pipeline["tokenizer"], root / "texts", seq_len=128, val_fraction=0.2, progress=False)
    run = root / "run"
    train(load_finetune_config(None, [f"data.train={root / 'texts'}", f"train.init_from={sft_start}", f"log.dir={run}",
                                      "train.eval_every=0", "train.steps=30", *RUN, *CLASSIFY]), "finetune")
    return {"raw": raw, "texts": root / "texts", "ckpt": store.resolve(run / "checkpoints")}


def test_held_out_accuracy_is_well_above_chance(classifier):
    result = evaluate_checkpoint(classifier["ckpt"], [str(classifier["texts"])], "val", None, ["train.micro_batch_size=1"])
    assert result.names == ["comedy", "history", "tragedy"] and result.texts > 80
    assert result.accuracy > 0.6 and result.macro_f1 > 0.5  # chance is a third
    assert sum(result.confusion[i][i] for i in range(3)) == round(result.accuracy * result.texts)
    out = subprocess.run([sys.executable, "-m", "scalelm", "eval", str(classifier["ckpt"]), "--data",
                          str(classifier["texts"]), "--batch-size", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "macro-F1" in out.stdout and "confusion (rows: class, columns: predicted comedy, history, tragedy)" in out.stdout


def test_a_pipeline_of_two_stages_classifies_as_one_process_does(classifier):
    def evaluate(*layout: str) -> str:
        out = subprocess.run([sys.executable, "-m", "scalelm", "eval", str(classifier["ckpt"]), "--data",
                              str(classifier["texts"]), "--batch-size", "1", *layout], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return re.sub(r"\(scalelm tensor .*?\)", "(ENGINE)", out.stdout)  # the figures, less the layout's name

    assert evaluate("--nproc-per-node", "2", "parallel.pipeline=2") == evaluate()


def test_the_export_classifies_as_scalelm_does(classifier, pipeline, tmp_path):
    from transformers import AutoModelForSequenceClassification

    report = to_hf(classifier["ckpt"], tmp_path / "hf")
    assert report["parity"]["max_abs_diff"] <= 1e-4
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.num_labels == 3
    sp, names = load_tokenizer(pipeline["tokenizer"]), ["comedy", "history", "tragedy"]
    right = total = 0
    with torch.no_grad():
        for _, text, label in read_labelled([classifier["raw"]]):
            if is_val(json.dumps([text, label]), 0.2):
                ids = torch.as_tensor([sp.bos_id(), *sp.encode(text)][:128])[None]
                right += int(hf(input_ids=ids).logits.argmax(-1)) == names.index(label)
                total += 1
    ours = evaluate_checkpoint(classifier["ckpt"], [str(classifier["texts"])], "val", None, ["train.micro_batch_size=1"])
    assert total == ours.texts and right == round(ours.accuracy * ours.texts)


def test_more_classes_than_the_head_has_are_refused(classifier, sft_start, tmp_path):
    cfg = load_finetune_config(None, [f"data.train={classifier['texts']}", f"train.init_from={sft_start}",
                                      f"log.dir={tmp_path}", *RUN, *CLASSIFY, "finetune.num_labels=2"])
    with pytest.raises(DataError, match="holds 3 classes .* more than finetune.num_labels=2"):
        train(cfg, "finetune")


def test_a_lora_classifier_trains_its_adapters_and_head_and_exports_to_peft(classifier, sft_start, tmp_path):
    from scalelm.convert.gguf_lora import to_gguf_lora
    from scalelm.convert.peft import to_peft
    from scalelm.errors import ConversionError

    run = tmp_path / "run"
    train(load_finetune_config(None, [f"data.train={classifier['texts']}", f"train.init_from={sft_start}", f"log.dir={run}",
                                      "train.eval_every=0", "train.steps=30", *RUN, *CLASSIFY, "optim.lr=1e-2",
                                      "finetune.lora.rank=8", "finetune.lora.alpha=32",
                                      "finetune.lora.targets=[qkv,proj,fc1,fc2]"]), "finetune")
    ckpt = store.resolve(run / "checkpoints")
    saved = set(store.read_manifest(ckpt)["tensors"])
    assert "head.score" in saved and all(".lora." in name for name in saved - {"head.score"})  # the base is not saved
    events = (run / "events.log").read_text()
    assert "(192 of them the classification head's)" in events and " texts into " in events  # 3 classes x 64
    # loaded in-framework: the base's body, then the adapters and the head from the checkpoint
    result = evaluate_checkpoint(ckpt, [str(classifier["texts"])], "val", None, ["train.micro_batch_size=1"])
    assert result.accuracy > 0.5  # chance is a third
    assert to_hf(ckpt, tmp_path / "hf")["parity"]["max_abs_diff"] <= 1e-4  # merged: a *ForSequenceClassification
    report = to_peft(ckpt, tmp_path / "peft")  # checked in PeftModel on the base as *ForSequenceClassification
    assert report["parity"]["max_abs_diff"] <= 1e-4 and "ForSequenceClassification" in report["parity"]["what"]
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    with pytest.raises(ConversionError, match="has a classification head"):
        to_gguf_lora(ckpt, tmp_path / "adapter.gguf")
