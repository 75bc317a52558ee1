"""model.causal=false: every token attends to every token of its window (or, packed, of its document), checked
against a plain PyTorch transformer written here, on one process and on two tensor ranks."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import VOCAB, bidirectional, tiny_config


def reference_logits(weights: dict[str, torch.Tensor], tokens: torch.Tensor, causal: bool) -> torch.Tensor:
    """The tiny GPT-3-style model (learned positions, LayerNorm, GELU, biases, tied embedding) in plain PyTorch:
    (b, s) tokens -> (b, s, V) logits; attention over every position, or with `causal` over the ones before."""
    cfg = tiny_config([]).model
    h, n = cfg.hidden_size, cfg.num_heads
    d = h // n
    b, s = tokens.shape
    x = weights["embedding.word.weight"][tokens] + weights["embedding.position.weight"][:s]
    for i in range(cfg.num_layers):
        p = f"blocks.{i}.layer."

        def linear(name, y):
            return F.linear(y, weights[p + name + ".weight"], weights[p + name + ".bias"])

        y = F.layer_norm(x, (h,), weights[p + "input_layernorm.weight"], weights[p + "input_layernorm.bias"], cfg.norm_eps)
        # megatron fuses Q, K, V per head group; with as many groups as heads each head's rows are its q, k and v
        q, k, v = linear("self_attention.linear_qkv", y).view(b, s, n, 3, d).unbind(3)  # (b, s, n, d) each
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d)
        if causal:
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        attended = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(b, s, h)
        x = x + linear("self_attention.linear_proj", attended)
        y = F.layer_norm(x, (h,), weights[p + "pre_mlp_layernorm.weight"], weights[p + "pre_mlp_layernorm.bias"], cfg.norm_eps)
        x = x + linear("mlp.linear_fc2", F.gelu(linear("mlp.linear_fc1", y)))
    x = F.layer_norm(x, (h,), weights["norm.norm.weight"], weights["norm.norm.bias"], cfg.norm_eps)
    return (x @ weights["embedding.word.weight"].t())[..., :VOCAB]


@pytest.fixture(scope="module")
def one_process():
    (result,) = run_ranks(1, bidirectional, [])
    return result


def test_a_bidirectional_model_computes_the_plain_reference(one_process):
    expected = reference_logits(one_process["weights"], one_process["tokens"], causal=False)
    assert (one_process["logits"] - expected).abs().max().item() < 1e-5
    # the reference tells the two apart: with the causal mask it is another function
    causal = reference_logits(one_process["weights"], one_process["tokens"], causal=True)
    assert (one_process["logits"] - causal).abs().max().item() > 1e-2
    assert one_process["packed_diff"] < 1e-5  # a packed document attends to all of itself, and to nothing else


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.tensor=2", "parallel.sequence_parallel=true"],
                                    ["parallel.tensor=2", "train.packed_attention=flex"]], ids=["tp2", "tp2-sp", "tp2-flex"])
def test_two_tensor_ranks_compute_what_one_process_does(layout, one_process):
    results = run_ranks(2, bidirectional, layout)
    for result in results:
        assert (result["logits"] - one_process["logits"]).abs().max().item() < 1e-5
        assert result["packed_diff"] < 1e-5
