"""A batch of prompts continued on the training model's own layers: one prefill pass, then one token a step, the
keys and values of earlier tokens kept in a cache preallocated for the batch.

    prompts, left-padded ─prefill─▶ logits of each row's last token ─pick─▶ token ─one-token step─▶ ... ─▶ Completion
                                     (the cache holds every slot's keys and values; each step appends one slot)

The cache is megatron-core's `StaticInferenceContext`, the one its attention layers append to and read from; its
buffers (slots, batch, this rank's key-value heads, head dim) are allocated here, on the model's device. Under
tensor parallelism each rank caches its own heads and the last token's logits are gathered over the vocabulary
(b x V numbers a step). Under pipeline parallelism each stage runs its layers on the step's tokens and sends their
hidden state to the next; the last stage picks the tokens and tells every stage. Sequence parallelism is off while
decoding (a step holds one token, which does not split), which changes how the layers talk, not what they compute.

What makes it equal to a training forward pass, token for token:
- positions count from each row's first real token (learned positions and RoPE alike), not from its slot;
- a batch with padding gives every attention call a mask (causal, padding closed); one without gives none, and
  megatron-core's attention tells ours that a step's single query sees every cached key (its mask type no_mask),
  not SDPA's `is_causal`, which would align that query with the first key instead of the last;
- the logits are the model's own head's, in fp32 before any sampling setting touches them (sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext

from scalelm.generation.sampling import Sampling, pick, seeded
from scalelm.model.attention import SDPAttention
from scalelm.model.gpt import GPT, Block, Embedding, FinalNorm, Head


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


@dataclass
class Stage:
    """The layers this rank runs, in order: the whole model, or its pipeline stage's share. The first stage embeds,
    the last ends in the norm and the head; between stages the hidden state of the step's tokens is sent on."""

    embedding: Embedding | None
    blocks: list[Block]
    head: Callable[[torch.Tensor], torch.Tensor] | None  # hidden (s, b, h) -> logits (s, b, V/tp), after the norm
    vocab_size: int | None  # the last stage's

    @property
    def masks(self) -> bool:
        """Whether its attention takes an explicit mask, which a left-padded batch needs: scalelm's SDPA does;
        Transformer Engine's causal attention (a GPU's spec) reads none, so its batches must hold prompts of one
        length (rollouts.py groups them so)."""
        return all(isinstance(block.layer.self_attention.core_attention, SDPAttention) for block in self.blocks)

    @property
    def vocabulary(self) -> int | None:
        """The real vocabulary, known to the first and the last stage."""
        return self.vocab_size or (self.embedding.vocab_size if self.embedding is not None else None)

    @classmethod
    def of(cls, module: torch.nn.Module) -> "Stage":
        """`module`: a GPT, or a DeepSpeed PipelineModule of its layers (model/build.py)."""
        if isinstance(module, GPT):
            vocab = (module.embedding.head if module.head is None else module.head).vocab_size
            return cls(module.embedding, list(module.blocks), lambda x: module.logits(module.norm(x)), vocab)
        layers = module.forward_funcs  # DeepSpeed's; a tied head is partial(_tied_logits, the embedding)
        norm = next((f for f in layers if isinstance(f, FinalNorm)), None)
        end = layers[-1] if norm is not None else None
        vocab = None if end is None else end.vocab_size if isinstance(end, Head) else end.args[0].head.vocab_size
        return cls(layers[0] if isinstance(layers[0], Embedding) else None,
                   [f for f in layers if isinstance(f, Block)], None if end is None else lambda x: end(norm(x)), vocab)

    @property
    def first(self) -> bool:
        return self.embedding is not None

    @property
    def last(self) -> bool:
        return self.head is not None


@torch.no_grad()  # NOTE: not inference_mode: a tensor cached on the way (RoPE's angles) would then fail training's backward
def decode(stage: Stage, context: int, prompts: list[list[int]], work: list[tuple[int, int]], sampling: Sampling,
           eos: set[int], stopped: Callable[[list[int]], bool] | None = None) -> list[Completion]:
    """The completion of each (prompt index, sample index) in `work`, one batch, on every stage of the pipeline;
    `context`: the model's longest sequence; `stopped(token_ids)`: whether a completion has produced a stop text.
    Every prompt fits the context."""
    device = next(stage.blocks[0].parameters()).device
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
    # (b, slots); a row that has reached its limit is still fed (and ignored) while others go on, past the context
    positions = (slot[None] - pad[:, None]).clamp(min=0, max=context - 1)
    real = slot[None] >= pad[:, None]  # (b, slots): a token, not padding
    rotary = stage.blocks[0].rotary(slots, positions)
    cache = kv_cache(stage.blocks, len(rows), slots, device)
    pipe = _Pipe.of(stage)
    seen = None
    if stage.last:
        seen = torch.zeros(len(rows), stage.vocab_size, dtype=torch.bool, device=device)
        for r, row in enumerate(rows):
            seen[r, torch.tensor(row, device=device)] = True
    generators = [seeded(sampling, p, s, device) for p, s in work]
    out = [Completion(p, s) for p, s in work]

    padded = bool(pad.any())  # without padding, attention is plain causal (prefill) or sees every key (a step)
    causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
    allowed = (causal[None] & real[:, None, :longest]) | torch.eye(longest, dtype=torch.bool, device=device)
    logits = _step(stage, pipe, ids[:, :longest], positions[:, :longest], ~allowed[:, None] if padded else None,
                   rotary, cache)
    for t in range(max(limits)):
        tokens, logprobs, sampling_logprobs = pipe.from_last(pick(logits, seen, sampling, generators) if stage.last
                                                             else None, len(rows), device)
        picked = zip(tokens.tolist(), logprobs.tolist(), sampling_logprobs.tolist())
        for r, (c, (token, logprob, sampling_logprob)) in enumerate(zip(out, picked)):
            if c.finish:
                continue
            c.token_ids.append(token)
            c.logprobs.append(logprob)
            c.sampling_logprobs.append(sampling_logprob)
            if c.token_ids[-1] in eos or (stopped is not None and stopped(c.token_ids)):
                c.finish = "stop"
            elif len(c.token_ids) == limits[r]:
                c.finish = "length"
        if all(c.finish for c in out):
            break
        now = longest + t
        ids[:, now] = tokens
        if seen is not None:
            seen[torch.arange(len(rows), device=device), tokens] = True
        logits = _step(stage, pipe, ids[:, now:now + 1], positions[:, now:now + 1],
                       ~real[:, None, None, :now + 1] if padded else None, rotary, cache)
    return out


def kv_cache(blocks: list[Block], batch: int, slots: int, device: torch.device) -> StaticInferenceContext:
    """megatron-core's static cache with a key and a value buffer per layer, (slots, batch, heads here, head dim)."""
    cache = StaticInferenceContext(batch, slots)
    for block in blocks:
        attention = block.layer.self_attention
        shape = (slots, batch, attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head)
        dtype = next(attention.parameters()).dtype
        cache.key_value_memory_dict[attention.layer_number] = (torch.empty(shape, dtype=dtype, device=device),
                                                               torch.empty(shape, dtype=dtype, device=device))
    return cache


def _step(stage: Stage, pipe: "_Pipe", ids: torch.Tensor, positions: torch.Tensor, masked: torch.Tensor | None,
          rotary: torch.Tensor | None, cache: StaticInferenceContext) -> torch.Tensor | None:
    """ids (b, s), the tokens after those cached, at `positions` (b, s) -> on the last stage the last one's logits
    (b, V), fp32; None on the others, which pass their hidden state on."""
    block = stage.blocks[0]
    if stage.first:
        hidden = stage.embedding.embed(ids, positions)
    else:
        hidden = pipe.receive((ids.shape[1], ids.shape[0], block.layer.config.hidden_size),
                              next(block.parameters()).dtype, ids.device)
    for block in stage.blocks:
        hidden = block.cached(hidden, masked, rotary, cache)
    cache.sequence_len_offset += ids.shape[1]
    cache.enable_decode_mode()
    if not stage.last:
        pipe.send(hidden)
        return None
    logits = stage.head(hidden[-1:])[0]  # (b, V/tp)
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)[:, :stage.vocab_size].float()


@dataclass
class _Pipe:
    """The pipeline's ranks around this one (global), and its group; without a pipeline, nothing is sent."""

    previous: int | None
    next: int | None
    last: int
    group: object | None

    @classmethod
    def of(cls, stage: Stage) -> "_Pipe":
        if stage.first and stage.last:
            return cls(None, None, 0, None)
        return cls(None if stage.first else parallel_state.get_pipeline_model_parallel_prev_rank(),
                   None if stage.last else parallel_state.get_pipeline_model_parallel_next_rank(),
                   parallel_state.get_pipeline_model_parallel_last_rank(),
                   parallel_state.get_pipeline_model_parallel_group())

    def send(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.contiguous(), self.next)

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        hidden = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(hidden, self.previous)
        return hidden

    def from_last(self, picked: tuple[torch.Tensor, ...] | None, rows: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last stage's (tokens, logprobs, sampling_logprobs), on every stage of the pipeline."""
        if self.group is None:
            return picked
        both = torch.stack([t.double() for t in picked]) if picked is not None else torch.empty(3, rows, dtype=torch.float64, device=device)
        dist.broadcast(both, self.last, group=self.group)
        return both[0].long(), both[1].float(), both[2].float()
