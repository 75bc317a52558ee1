"""A GPT written from scratch in plain PyTorch, for bench/train_throughput.py to measure scalelm against: torch.nn
layers, SDPA, AdamW, nothing from megatron-core, DeepSpeed or scalelm's model. The shape is a scalelm ModelConfig's
(GPT-3 style: learned positions, pre-LayerNorm, GELU MLP, biases, tied embeddings, or Llama style: RoPE, RMSNorm,
SwiGLU, grouped-query attention), so the two do the same arithmetic; it is not meant to load scalelm's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainGPT(nn.Module):
    def __init__(self, m, vocab_size: int, seq_len: int):
        super().__init__()
        self.m = m
        self.word = nn.Embedding(vocab_size, m.hidden_size)
        self.position = nn.Embedding(m.max_position_embeddings or seq_len, m.hidden_size) if m.position_embedding == "learned" else None
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        self.norm = norm(m)
        self.head = None if m.tie_embeddings else nn.Linear(m.hidden_size, vocab_size, bias=False)
        if m.position_embedding == "rope":
            d = m.hidden_size // m.num_heads
            angles = torch.outer(torch.arange(seq_len).float(), m.rope_base ** (-torch.arange(0, d, 2).float() / d))
            self.register_buffer("cos", angles.cos().repeat(1, 2), persistent=False)  # (s, d)
            self.register_buffer("sin", angles.sin().repeat(1, 2), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=m.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, s) ids -> (b, s, V) logits."""
        x = self.word(input_ids)
        if self.position is not None:
            x = x + self.position(torch.arange(input_ids.shape[1], device=input_ids.device))
        rope = (self.cos[: input_ids.shape[1]], self.sin[: input_ids.shape[1]]) if self.position is None else None
        for block in self.blocks:
            x = block(x, rope)
        x = self.norm(x)
        return F.linear(x, self.word.weight) if self.head is None else self.head(x)


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        h, heads, kv = m.hidden_size, m.num_heads, m.num_kv_heads or m.num_heads
        self.heads, self.kv, self.d = heads, kv, h // heads
        swiglu = m.activation == "swiglu"
        ffn = m.ffn_hidden_size or (-(-8 * h // 3 // 256) * 256 if swiglu else 4 * h)
        self.norm1, self.norm2 = norm(m), norm(m)
        self.qkv = nn.Linear(h, (heads + 2 * kv) * self.d, bias=m.bias)
        self.proj = nn.Linear(h, h, bias=m.bias)
        self.fc1 = nn.Linear(h, 2 * ffn if swiglu else ffn, bias=m.bias)
        self.fc2 = nn.Linear(ffn, h, bias=m.bias)
        self.swiglu = swiglu

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([self.heads * self.d, self.kv * self.d, self.kv * self.d], dim=-1)
        q, k, v = (t.view(b, s, -1, self.d).transpose(1, 2) for t in (q, k, v))  # (b, heads, s, d)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.heads)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, s, -1))
        y = self.fc1(self.norm2(x))
        y = F.silu(y.chunk(2, -1)[0]) * y.chunk(2, -1)[1] if self.swiglu else F.gelu(y)
        return x + self.fc2(y)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def norm(m) -> nn.Module:
    return nn.LayerNorm(m.hidden_size, eps=m.norm_eps) if m.normalization == "layernorm" else nn.RMSNorm(m.hidden_size, eps=m.norm_eps)
