"""model/lora.py's arithmetic: the sides of each target, the scale, adapter counts and the merge W + scale · B A."""

import math

import pytest
import torch

from scalelm.config import LoRAConfig, load_config
from scalelm.config.finetune import adapter_parameters, layer_sides
from scalelm.model import lora


@pytest.fixture
def llama():
    return load_config(None, ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.activation=swiglu",
                              "model.ffn_hidden_size=96", "model.num_layers=3"]).model


def test_sides_of_each_target(llama):
    # qkv: 4 query heads and 2 key/value groups of 16; fc1: SwiGLU's gate and up
    assert layer_sides(llama, "qkv") == (64, 64 + 2 * 2 * 16)
    assert layer_sides(llama, "proj") == (64, 64)
    assert layer_sides(llama, "fc1") == (64, 2 * 96)
    assert layer_sides(llama, "fc2") == (96, 64)
    assert adapter_parameters(llama, LoRAConfig(rank=4, targets=["qkv", "fc2"])) == 3 * 4 * ((64 + 128) + (96 + 64))


def test_scale_is_alpha_over_rank_or_its_root():
    assert lora.scale(LoRAConfig(rank=16, alpha=32)) == 2
    assert lora.scale(LoRAConfig(rank=16, alpha=32, rslora=True)) == 8
    assert math.isclose(lora.scale(LoRAConfig(rank=2, alpha=1, rslora=True)), 1 / math.sqrt(2))


def test_merge_adds_scale_b_a_to_the_adapted_weight_only():
    gen = torch.Generator().manual_seed(0)
    weights = {"blocks.0.layer.mlp.linear_fc2.weight": torch.randn(5, 7, generator=gen), "norm.norm.weight": torch.ones(5)}
    a, b = torch.randn(2, 7, generator=gen), torch.randn(5, 2, generator=gen)
    adapters = {"blocks.0.layer.mlp.linear_fc2.lora.a": a, "blocks.0.layer.mlp.linear_fc2.lora.b": b}
    settings = LoRAConfig(rank=2, alpha=3)
    merged = lora.merge(weights, adapters, settings)
    assert lora.adapted("blocks.0.layer.mlp.linear_fc2.lora.b") == "blocks.0.layer.mlp.linear_fc2.weight"
    torch.testing.assert_close(merged["blocks.0.layer.mlp.linear_fc2.weight"], weights["blocks.0.layer.mlp.linear_fc2.weight"]
                               + 1.5 * b @ a)
    assert merged["norm.norm.weight"] is weights["norm.norm.weight"] and set(merged) == set(weights)
    assert all(lora.is_adapter(name) for name in adapters) and not lora.is_adapter("norm.norm.weight")
