"""Packed documents' attention: the block mask is what it says, and flex attention's kernel computes what
SDPA with the boolean mask does (forward, eager on the CPU; backward too in tests/gpu)."""

import pytest
import torch

from scalelm.config import load_config
from scalelm.model.attention import SDPAttention, document_mask
from scalelm.model.spec import transformer_config
from scalelm.parallel.topology import single_process

DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4]])


def test_the_mask_is_causal_within_documents_and_closed_between():
    mask = document_mask(DOCS)[0, 0]  # True = may not attend
    for i in range(16):
        for j in range(16):
            assert mask[i, j] == (j > i or DOCS[0, i] != DOCS[0, j])


@pytest.mark.parametrize("gqa", [False, True])
def test_flex_attention_equals_sdpa_with_the_mask(gqa):
    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=16"])
    with single_process():
        attention = SDPAttention(transformer_config(cfg.model, cfg.parallel, on_gpu=False), 1, None, "self").eval()
        g = torch.Generator().manual_seed(0)
        q = torch.randn(16, 1, 4, 16, generator=g)  # (s, b, n, d)
        k, v = (torch.randn(16, 1, 2 if gqa else 4, 16, generator=g) for _ in range(2))
        plain = attention(q, k, v, document_mask(DOCS))
        fused = attention(q, k, v, document_mask(DOCS, "flex"))
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_attention_refuses_what_it_does_not_compute():
    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=64", "model.num_heads=4", "train.seq_len=16"])
    with single_process():
        attention = SDPAttention(transformer_config(cfg.model, cfg.parallel, on_gpu=False), 1, None, "self")
        q = torch.randn(16, 1, 4, 16)
        with pytest.raises(ValueError, match="not megatron's PackedSeqParams"):
            attention(q, q, q, None, packed_seq_params=object())
