import pytest

from scalelm.config import load_config
from scalelm.model.size import flops_per_token_megatron, flops_per_token_palm, parameter_count

GPT2_VOCAB = 50257


def test_gpt3_175b_has_175b_parameters():
    m = load_config("configs/gpt3-175b.yaml").model
    assert parameter_count(m, GPT2_VOCAB) == pytest.approx(175e9, rel=0.01)


def test_the_two_conventions_agree_where_they_should():
    """PaLM's 6N + 12LHQT and Megatron's 72lh^2(...) count the same matmuls for a GPT-3 model."""
    cfg = load_config("configs/gpt3-175b.yaml")
    palm = flops_per_token_palm(cfg.model, GPT2_VOCAB, 2048)
    megatron = flops_per_token_megatron(cfg.model, GPT2_VOCAB, 2048, full_recompute=False)
    assert megatron == pytest.approx(palm, rel=0.02)
    assert flops_per_token_megatron(cfg.model, GPT2_VOCAB, 2048, full_recompute=True) > 1.3 * megatron
