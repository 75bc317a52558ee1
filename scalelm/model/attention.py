"""Core attention through torch's scaled_dot_product_attention, for megatron-core's local layer spec.

megatron-core's own local core attention materialises the (s x s) score matrix and builds its causal
mask on a CUDA device; SDPA picks flash, cuDNN or memory-efficient kernels on a GPU, runs on the CPU,
and handles grouped-query attention itself. Same constructor and forward as megatron's
DotProductAttention, so it drops into `SelfAttentionSubmodules.core_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """softmax(Q K^T * scale + causal mask) V over this rank's heads; query (s, b, n, d), key/value (s, b, g, d)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (s, b, n, d) -> (b, n, s, d)
        dropout = self.dropout if self.training else 0.0
        # NOTE: heads are split over tensor-parallel ranks, so their dropout masks must differ: the
        # model-parallel RNG stream gives each rank its own.
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)  # (s, b, n * d)
