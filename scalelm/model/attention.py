"""Core attention through torch's scaled_dot_product_attention, for megatron-core's local layer spec.

megatron-core's own local core attention materialises the (s x s) score matrix and builds its causal
mask on a CUDA device; SDPA picks flash, cuDNN or memory-efficient kernels on a GPU, runs on the CPU,
and handles grouped-query attention itself. Same constructor and forward as megatron's
DotProductAttention, so it drops into `SelfAttentionSubmodules.core_attention`.

Without a mask, attention is causal over the whole window (SDPA's `is_causal`, which keeps the flash
kernels), or with model.causal=false (the layer spec's attn_mask_type no_mask) every token attends to every
other. With packed documents the block builds `document_mask(document_ids)`, causal (or not) within each
document and closed between them, and it is used as given: a boolean mask for SDPA (any device;
the memory-efficient kernel on a GPU), or with `train.packed_attention=flex` flex attention's block
mask, whose kernel skips the blocks no query of a document may see (compiled on a GPU; eager, and
slow, on the CPU, where it is tested against the plain path). megatron's `PackedSeqParams` (the THD
format of Transformer Engine) is refused rather than ignored.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

KERNELS = ("sdpa", "flex")


def document_mask(document_ids: torch.Tensor, kernel: str = "sdpa", causal: bool = True) -> torch.Tensor | BlockMask:
    """document_ids (b, s) -> where query i may NOT attend to key j (megatron's convention): j in another document
    than i, or (causal) j > i. Every query keeps at least itself, so no row is all masked.

    sdpa: a (b, 1, s, s) bool tensor, True = masked; flex: flex attention's BlockMask of the same pattern."""
    if kernel == "flex":
        def allowed(b, h, q, kv):
            same = document_ids[b, q] == document_ids[b, kv]
            return same & (q >= kv) if causal else same

        b, s = document_ids.shape
        return create_block_mask(allowed, b, None, s, s, device=document_ids.device)
    same = document_ids[:, None, :, None] == document_ids[:, None, None, :]  # (b, 1, s, s)
    if not causal:
        return ~same
    s = document_ids.shape[1]
    before = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return ~(same & before)


@cache
def _flex(on_gpu: bool):
    """flex attention, compiled into a fused kernel on a GPU (once per process); eager on the CPU."""
    return torch.compile(flex_attention, dynamic=False) if on_gpu else flex_attention


class SDPAttention(MegatronModule):
    """softmax(Q K^T * scale + mask) V over this rank's heads; query (s, b, n, d), key/value (s, b, g, d).

    attention_mask: None (the whole window: causal, or with attn_mask_type no_mask every position) or
    document_mask's (b, 1, s, s), True = not attended."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.causal = attn_mask_type != AttnMaskType.no_mask  # the layer spec's, which the model's config chose

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("scalelm's SDPA attention takes packed documents as document_ids (a block mask), "
                             "not megatron's PackedSeqParams or an attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (s, b, n, d) -> (b, n, s, d)
        dropout = self.dropout if self.training else 0.0
        if isinstance(attention_mask, BlockMask):
            if dropout:
                raise ValueError("flex attention has no attention dropout: use train.packed_attention=sdpa with "
                                 "model.attention_dropout > 0")
            out = _flex(q.is_cuda)(q, k, v, block_mask=attention_mask, scale=self.softmax_scale,
                                   enable_gqa=q.shape[1] != k.shape[1])
            b, n, s, d = out.shape
            return out.permute(2, 0, 1, 3).reshape(s, b, n * d)
        allowed = None if attention_mask is None else ~attention_mask
        # megatron-core's attention says no_mask when a decoding step's one query follows its cached keys
        causal = self.causal if attn_mask_type is None else attn_mask_type != AttnMaskType.no_mask
        # NOTE: heads are split over tensor-parallel ranks, so their dropout masks must differ: the
        # model-parallel RNG stream gives each rank its own.
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=allowed is None and causal,
                                                 scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)  # (s, b, n * d)
