"""What a transformer layer is made of: megatron-core's TransformerConfig and layer spec, chosen here.

The one place that picks kernels: the Transformer Engine spec when `transformer_engine` imports and
the model runs on a GPU, else megatron-core's local spec with two of its parts replaced by ours:
torch SDPA as core attention (model/attention.py) and plain torch norms that also work with
sequence parallelism (megatron's wrapped torch norm refuses it).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from scalelm.config import ModelConfig, ParallelConfig
from scalelm.model.attention import SDPAttention

# The padded vocabulary is a multiple of this, so the embedding splits evenly over any tensor-parallel
# size that divides 128 (config validation allows no other) and the padded size does not depend on the layout.
VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# Transformer Engine's layers carry the norms inside the linears; their checkpoints name them so.
_TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
             "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}


def local_name(name: str) -> str:
    """The local spec's name of a tensor that Transformer Engine's spec names otherwise (its norms inside linears)."""
    for te, local in _TE_NAMES.items():
        if name.endswith(te):
            return name.removesuffix(te) + local
    return name


def use_transformer_engine(on_gpu: bool) -> bool:
    return on_gpu and importlib.util.find_spec("transformer_engine") is not None


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, on_gpu: bool,
                       recompute: str = "none") -> TransformerConfig:
    """megatron-core's config for one layer stack; fusions only on a GPU, CPU initialisation on the CPU."""
    swiglu = model.activation == "swiglu"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_heads,
        num_query_groups=model.num_kv_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="LayerNorm" if model.normalization == "layernorm" else "RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=model.bias,
        hidden_dropout=model.dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tensor,
        # NOTE: DeepSpeed runs the pipeline; megatron's layers must not see one, or they would offset
        # the global layer numbers scalelm gives them by this stage's position a second time.
        pipeline_model_parallel_size=1,
        sequence_parallel=parallel.sequence_parallel,
        recompute_granularity="selective" if recompute == "selective" else None,
        params_dtype=torch.float32,
        # NOTE: megatron's CPU initialisation draws each layer's whole weight and keeps this rank's
        # slice, so every tensor and pipeline layout starts from the same weights, on a GPU too.
        use_cpu_initialization=True,
        # NOTE: megatron's fused GELU is the tanh approximation; the plain path is exact (erf) GELU,
        # which is also what the Hugging Face export names. Only SwiGLU, exact either way, is fused.
        bias_activation_fusion=on_gpu and swiglu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec(on_gpu: bool, documents: bool = False, fused_norms: bool = True, causal: bool = True) -> ModuleSpec:
    """The transformer layer's modules: Transformer Engine's, or megatron's local ones with ours swapped in.
    With packed documents (`documents`), or without `causal` (every token attends to every other: the
    attention's attn_mask_type no_mask), core attention is always scalelm's SDPA, which takes their block
    mask and the mask type; Transformer Engine's causal attention would not. Without `fused_norms` (LoRA, whose
    adapters read the normalised input of qkv and fc1, which Transformer Engine's linears fuse the norm into)
    the local spec is used."""
    if use_transformer_engine(on_gpu) and fused_norms:
        spec = get_gpt_layer_with_transformer_engine_spec()
        if documents or not causal:
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
    else:
        spec = get_gpt_layer_local_spec()
        spec.submodules.input_layernorm = Norm
        spec.submodules.pre_mlp_layernorm = Norm
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if not causal:
        spec.submodules.self_attention.params = {**spec.submodules.self_attention.params,
                                                 "attn_mask_type": AttnMaskType.no_mask}
    return spec


class Norm:
    """torch LayerNorm or RMSNorm as the config says. Under sequence parallelism each rank normalises
    part of the sequence, so the weights are marked `sequence_parallel`, as megatron marks the row-parallel
    biases, to have their gradients summed over the tensor group (scalelm.parallel.grads)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused) -> nn.Module:
        norm = (nn.LayerNorm(hidden_size, eps=eps, bias=config.add_bias_linear) if config.normalization == "LayerNorm"
                else nn.RMSNorm(hidden_size, eps=eps))
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
