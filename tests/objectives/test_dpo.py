"""DPO's objective (objectives/dpo.py): per-side log-probs of packed pairs equal each side's alone, and each loss is
its formula, computed here from the log-probs by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from scalelm.config import DPOConfig
from scalelm.model.build import build_model
from scalelm.objectives.documents import document_sums, pairs_of
from scalelm.objectives.dpo import DPO
from scalelm.objectives.tokens import token_logps
from scalelm.parallel.topology import single_process
from tests.helpers.batches import preference_batch
from tests.helpers.workloads import LLAMA, VOCAB, tiny_config


@pytest.mark.parametrize("architecture", [[], LLAMA], ids=["gpt3", "llama"])
def test_a_side_in_a_packed_window_has_the_log_prob_it_has_alone(architecture):
    cfg = tiny_config(architecture + ["train.seq_len=32"])
    batch = preference_batch(6, 32, torch.Generator().manual_seed(1), reference=False)
    with single_process() as layout:
        model = build_model(cfg, layout, VOCAB, documents=True).eval()
        with torch.no_grad():
            packed = document_logps(model(batch["input_ids"], batch["position_ids"], batch["document_ids"]), batch)
            checked = 0
            for row in range(6):
                docs = batch["document_ids"][row]
                for doc in range(int(docs.max())):  # the last document is the padding
                    keep = docs == doc
                    alone = {k: batch[k][row][keep][None] for k in ("input_ids", "labels", "loss_mask")}
                    alone["document_ids"] = torch.zeros_like(alone["input_ids"])
                    value = document_logps(model(alone["input_ids"]), alone)[0, 0]  # no packing: plain causal attention
                    assert packed[row, doc].item() == pytest.approx(value.item(), abs=1e-5)
                    checked += 1
    assert checked >= 12 and (packed[:, 0] < 0).all()


def document_logps(logits, batch):
    """(b, L) each document's Σ log p over its targets, as DPO computes it from the log-probs the engine hands it."""
    return document_sums(token_logps(logits, batch["labels"]), batch)


def logps(batch):
    """Fixed per-document policy log-probs, as if from the model: the objective's `document_sums` replaced."""
    return torch.linspace(-30, -5, batch["input_ids"].numel()).reshape(batch["input_ids"].shape)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust"])
def test_each_loss_is_its_formula(loss, monkeypatch):
    batch = preference_batch(4, 32, torch.Generator().manual_seed(2), reference=True)
    dpo = DPOConfig(beta=0.3, loss=loss, label_smoothing=0.2 if loss == "robust" else 0.0, sft_weight=0.5)
    objective = DPO(SimpleNamespace(finetune=SimpleNamespace(dpo=dpo)))
    monkeypatch.setattr("scalelm.objectives.dpo.document_sums", lambda values, b: logps(b))
    total, metrics = objective(None, batch)
    expected, pairs, accurate = 0.0, 0, 0
    policy, reference = logps(batch), batch["reference"]
    for row in range(4):
        mask, docs = batch["loss_mask"][row], batch["document_ids"][row]
        for k in range(int(docs.max()) // 2):
            n_c, n_r = (int((mask & (docs == d)).sum()) for d in (2 * k, 2 * k + 1))
            c = policy[row, 2 * k].item() - reference[row, 2 * k].item()
            r = policy[row, 2 * k + 1].item() - reference[row, 2 * k + 1].item()
            z = 0.3 * (c - r)
            value = {"sigmoid": math.log1p(math.exp(-z)), "hinge": max(0.0, 1 - z),
                     "ipo": (c / n_c - r / n_r - 1 / 0.6) ** 2,
                     "robust": (0.8 * math.log1p(math.exp(-z)) - 0.2 * math.log1p(math.exp(z))) / 0.6}[loss]
            expected += value - 0.5 * policy[row, 2 * k].item() / n_c
            pairs, accurate = pairs + 1, accurate + (c > r)
    assert objective.units(batch) == pairs >= 4
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["reward_accuracy"].item() == accurate
    assert metrics["reward_margin"].item() == pytest.approx(metrics["reward_chosen"].item() - metrics["reward_rejected"].item(),
                                                           abs=1e-4)


def test_pairs_are_the_even_and_odd_documents():
    chosen, rejected = pairs_of(torch.arange(10.0).reshape(1, 10))
    assert chosen.tolist() == [[0, 2, 4, 6, 8]] and rejected.tolist() == [[1, 3, 5, 7, 9]]
