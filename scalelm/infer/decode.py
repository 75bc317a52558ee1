"""A batch of prompts continued on the training model's own layers: one prefill pass, then one token a step, the
keys and values of earlier tokens kept in a cache preallocated for the batch.

    prompts, left-padded ─prefill─▶ logits of each row's last token ─pick─▶ token ─one-token step─▶ ... ─▶ Completion
                                     (the cache holds every slot's keys and values; each step appends one slot)

The cache is megatron-core's `StaticInferenceContext`, the one its attention layers append to and read from; its
buffers (slots, batch, this rank's key-value heads, head dim) are allocated here, on the model's device. Under
tensor parallelism each rank caches its own heads and the last token's logits are gathered over the vocabulary
(b x V numbers a step); sequence parallelism is off while decoding (a step holds one token, which does not split),
which changes how the layers talk, not what they compute.

What makes it equal to a training forward pass, token for token:
- positions count from each row's first real token (learned positions and RoPE alike), not from its slot;
- every attention call gets an explicit mask (causal, padding closed), never SDPA's `is_causal`, which aligns a
  single query with the first key instead of the last;
- the logits are the model's own head's, in fp32 before any sampling setting touches them (sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from megatron.core import tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext

from scalelm.infer.sampling import Sampling, pick, seeded
from scalelm.model.gpt import GPT


@dataclass
class Completion:
    """One sample's new tokens, their two kinds of log-probability (sampling.py) and why it ended: "stop" (EOS or
    a stop text), "length" (max_new_tokens, or the model's context)."""

    prompt: int
    sample: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampling_logprobs: list[float] = field(default_factory=list)
    finish: str = ""


@torch.no_grad()
def decode(model: GPT, vocab_size: int, context: int, prompts: list[list[int]], work: list[tuple[int, int]],
           sampling: Sampling, eos: set[int], stopped: Callable[[list[int]], bool] | None = None) -> list[Completion]:
    """The completion of each (prompt index, sample index) in `work`, one batch; `context`: the model's longest
    sequence; `stopped(token_ids)`: whether a completion has produced a stop text. Every prompt fits the context."""
    device = next(model.parameters()).device
    rows = [prompts[p] for p, _ in work]
    lengths = torch.tensor([len(r) for r in rows], device=device)
    longest = int(lengths.max())
    limits = [min(sampling.max_new_tokens, context - len(r)) for r in rows]
    slots = longest + max(limits)
    pad = longest - lengths  # each row is right-aligned at the prompt's end
    ids = torch.zeros(len(rows), slots, dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        ids[r, int(pad[r]):longest] = torch.tensor(row, device=device)
    slot = torch.arange(slots, device=device)
    positions = (slot[None] - pad[:, None]).clamp(min=0)  # (b, slots)
    real = slot[None] >= pad[:, None]  # (b, slots): a token, not padding
    rotary = model.blocks[0].rotary(slots, positions)
    cache = kv_cache(model, len(rows), slots, device)
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for r, row in enumerate(rows):
        seen[r, torch.tensor(row, device=device)] = True
    generators = [seeded(sampling, p, s, device) for p, s in work]
    out = [Completion(p, s) for p, s in work]

    causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
    allowed = (causal[None] & real[:, None, :longest]) | torch.eye(longest, dtype=torch.bool, device=device)
    logits = _step(model, ids[:, :longest], positions[:, :longest], ~allowed[:, None], rotary, cache, vocab_size)
    for t in range(max(limits)):
        tokens, logprobs, sampling_logprobs = pick(logits, seen, sampling, generators)
        for r, c in enumerate(out):
            if c.finish:
                continue
            c.token_ids.append(int(tokens[r]))
            c.logprobs.append(float(logprobs[r]))
            c.sampling_logprobs.append(float(sampling_logprobs[r]))
            if c.token_ids[-1] in eos or (stopped is not None and stopped(c.token_ids)):
                c.finish = "stop"
            elif len(c.token_ids) == limits[r]:
                c.finish = "length"
        if all(c.finish for c in out):
            break
        now = longest + t
        ids[:, now] = tokens
        seen[torch.arange(len(rows), device=device), tokens] = True
        logits = _step(model, ids[:, now:now + 1], positions[:, now:now + 1], ~real[:, None, None, :now + 1], rotary,
                       cache, vocab_size)
    return out


def kv_cache(model: GPT, batch: int, slots: int, device: torch.device) -> StaticInferenceContext:
    """megatron-core's static cache with a key and a value buffer per layer, (slots, batch, heads here, head dim)."""
    cache = StaticInferenceContext(batch, slots)
    for block in model.blocks:
        attention = block.layer.self_attention
        shape = (slots, batch, attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head)
        dtype = next(attention.parameters()).dtype
        cache.key_value_memory_dict[attention.layer_number] = (torch.empty(shape, dtype=dtype, device=device),
                                                               torch.empty(shape, dtype=dtype, device=device))
    return cache


def _step(model: GPT, ids: torch.Tensor, positions: torch.Tensor, masked: torch.Tensor, rotary: torch.Tensor | None,
          cache: StaticInferenceContext, vocab_size: int) -> torch.Tensor:
    """ids (b, s), the tokens after those cached, at `positions` (b, s) -> the last one's logits (b, V), fp32."""
    hidden = model.embedding.embed(ids, positions)
    for block in model.blocks:
        hidden = block.cached(hidden, masked, rotary, cache)
    cache.sequence_len_offset += ids.shape[1]
    cache.enable_decode_mode()
    logits = model.logits(model.norm(hidden[-1:]))[0]  # (b, V/tp)
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)[:, :vocab_size].float()
