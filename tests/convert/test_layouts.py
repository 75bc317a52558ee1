"""The tensor maps between scalelm and Hugging Face, on random weights (large enough that a misplaced
row shows): each direction is the other's exact inverse, and the Hugging Face model computes what
scalelm's forward computes."""

import pytest
import torch

from scalelm.config import ModelConfig
from scalelm.convert import layouts, parity
from scalelm.convert.gguf import gguf_tensors, hf_state, rope_halves, rope_neighbours
from scalelm.convert.hf import hf_config
from scalelm.errors import ConversionError
from scalelm.model.spec import padded_vocab_size

GPT2 = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, ffn_hidden_size=96, vocab_size=200,
                   max_position_embeddings=32, tie_embeddings=False)
LLAMA = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=96, vocab_size=200,
                    max_position_embeddings=32, position_embedding="rope", rope_base=500.0, normalization="rmsnorm",
                    activation="swiglu", bias=True, tie_embeddings=True)


def random_weights(model: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the model, N(0, 0.3), the vocabulary padding zero (as scalelm keeps it)."""
    g = torch.Generator().manual_seed(1)
    d, f, h = model.hidden_size // model.num_heads, model.ffn_hidden_size, model.hidden_size
    qkv = (model.num_heads + 2 * model.num_kv_heads) * d
    fc1 = 2 * f if model.activation == "swiglu" else f
    shapes = {"embedding.word.weight": (padded_vocab_size(model.vocab_size), h), "norm.norm.weight": (h,)}
    if model.position_embedding == "learned":
        shapes["embedding.position.weight"] = (model.max_position_embeddings, h)
    if not model.tie_embeddings:
        shapes["head.linear.weight"] = (padded_vocab_size(model.vocab_size), h)
    for i in range(model.num_layers):
        b = f"blocks.{i}.layer."
        shapes |= {b + "input_layernorm.weight": (h,), b + "pre_mlp_layernorm.weight": (h,),
                   b + "self_attention.linear_qkv.weight": (qkv, h), b + "self_attention.linear_proj.weight": (h, h),
                   b + "mlp.linear_fc1.weight": (fc1, h), b + "mlp.linear_fc2.weight": (h, f)}
        if model.bias:
            shapes |= {b + "self_attention.linear_qkv.bias": (qkv,), b + "self_attention.linear_proj.bias": (h,),
                       b + "mlp.linear_fc1.bias": (fc1,), b + "mlp.linear_fc2.bias": (h,)}
            if model.normalization == "layernorm":
                shapes |= {b + "input_layernorm.bias": (h,), b + "pre_mlp_layernorm.bias": (h,)}
    if model.bias and model.normalization == "layernorm":
        shapes["norm.norm.bias"] = (h,)
    weights = {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}
    for k in ("embedding.word.weight", "head.linear.weight"):
        if k in weights:
            weights[k][model.vocab_size:] = 0
    return weights


@pytest.mark.parametrize("model", [GPT2, LLAMA], ids=["gpt2", "llama-gqa"])
def test_hugging_face_model_computes_what_scalelm_computes(model):
    from transformers import AutoModelForCausalLM

    weights = random_weights(model)
    hf = AutoModelForCausalLM.from_config(hf_config(model), dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(layouts.to_hf(model, weights), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if model.tie_embeddings else set())
    hf.tie_weights()
    tokens = parity.probe_tokens(model.vocab_size, model.max_position_embeddings)
    ours = parity.scalelm_logits(model, weights, tokens)
    assert ours.std() > 0.3  # logits far from uniform, so a misplaced row would show
    report = parity.compare(ours, parity.hf_logits(hf, tokens), 1e-4, "hf")
    assert report["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("model", [GPT2, LLAMA], ids=["gpt2", "llama-gqa"])
def test_the_maps_are_exact_inverses(model):
    weights = random_weights(model)
    back = layouts.from_hf(model, layouts.to_hf(model, weights))
    assert back.keys() == weights.keys() and all(back[k].equal(weights[k]) for k in weights)
    state = layouts.to_hf(model, weights)
    again = hf_state(model, gguf_tensors(model, state))
    assert again.keys() == {k for k in state if not (model.tie_embeddings and k == "lm_head.weight")}
    assert all(again[k].equal(state[k]) for k in again)


def test_a_broken_map_fails_the_parity_check():
    model, weights = LLAMA, random_weights(LLAMA)
    from transformers import AutoModelForCausalLM

    state = layouts.to_hf(model, weights)
    q = "model.layers.0.self_attn.q_proj.weight"
    state[q] = rope_neighbours(state[q], model.num_heads)  # llama.cpp's order, wrong for transformers
    hf = AutoModelForCausalLM.from_config(hf_config(model), dtype=torch.float32)
    hf.load_state_dict(state, strict=False)
    tokens = parity.probe_tokens(model.vocab_size, model.max_position_embeddings)
    with pytest.raises(ConversionError, match="parity check failed"):
        parity.compare(parity.scalelm_logits(model, weights, tokens), parity.hf_logits(hf, tokens), 1e-4, "hf")


def test_qkv_and_rope_orders():
    heads, groups, d = 4, 2, 3
    q, k, v = torch.arange(12.0), torch.arange(100.0, 106.0), torch.arange(200.0, 206.0)
    fused = layouts.fuse_qkv(q, k, v, heads, groups, d)
    # group 0: query heads 0 and 1, key head 0, value head 0; then group 1
    assert fused[:12].tolist() == [*range(6), 100, 101, 102, 200, 201, 202]
    assert all(a.equal(b) for a, b in zip(layouts.split_qkv(fused, heads, groups, d), (q, k, v)))
    rows = torch.arange(8.0)  # one head of 8: halves (0..3 | 4..7) -> neighbours (0, 4, 1, 5, ...)
    assert rope_neighbours(rows, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert rope_halves(rope_neighbours(rows, 2), 2).equal(rows)


@pytest.mark.parametrize("change, field", [
    ({"position_embedding": "rope"}, "model.position_embedding=rope"),
    ({"activation": "swiglu"}, "model.activation=swiglu"),
    ({"num_kv_heads": 2}, "model.num_kv_heads=2"),
    ({"causal": False}, "model.causal=false"),
])
def test_a_model_no_layout_computes_is_refused(change, field):
    model = ModelConfig(**{**vars(GPT2), **change})
    with pytest.raises(ConversionError, match=field):
        layouts.hf_layout(model)


def test_a_missing_tensor_is_named():
    weights = random_weights(GPT2)
    del weights["blocks.1.layer.mlp.linear_fc2.weight"]
    with pytest.raises(ConversionError, match="blocks.1.layer.mlp.linear_fc2.weight is missing"):
        layouts.to_hf(GPT2, weights)
