"""The GPT decoder as a list of layers: embedding, megatron-core TransformerLayers, final norm, head.

    input_ids (b, s) ─Embedding─▶ (s, b, h) ─Block × L─▶ (s, b, h) ─FinalNorm─▶ ─Head─▶ logits (s, b, V/tp)
                                                                                └ScoreHead─▶ scores (s, b, n)

The model ends at the logits and knows no loss: an objective (scalelm/objectives) maps logits and a batch to a
loss, so pretraining, SFT and the preference losses share one model. Inside `hidden_states(model)` it ends before
its head instead, at the final norm's output (s, b, h). Attention is causal unless model.causal is false.

Packed documents. A window may hold several documents (conversations, or pretraining documents
with `data.document_mask`) that must not see each other. Then the layers pass, beside the hidden
state, the batch's `position_ids` (b, s), which restart at 0 with each document (learned positions
and RoPE alike), and `document_ids` (b, s), from which each block builds a block-diagonal causal
mask. Between layers the activations are therefore `hidden`, or `(hidden, position_ids, document_ids)`
(`split` / `join`); a run uses one or the other throughout, as DeepSpeed's pipeline needs.

The embedding and head hold the vocabulary padded to a multiple of 128 (`padded_vocab_size`), so it
splits evenly over tensor ranks; the padding is not part of the model: its logits are -inf, so the
softmax, the loss and every export (which keeps only the real rows) are the same function.

Activations are sequence-first, (s, b, h), as megatron-core's layers expect; under sequence
parallelism each tensor-parallel rank holds s/tp of the sequence between the layers' matmuls.
Every layer maps one tensor to one tensor, so the same list feeds DeepSpeed's pipeline engine or
runs in order as `GPT` when there is no pipeline.

Weights are initialised from (seed, layer index) alone: each layer is built under its own seed, and
megatron's CPU initialisation draws a layer's full weight before taking this rank's slice. So every
tensor- and pipeline-parallel layout starts from exactly the single-process weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Union

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from scalelm.config import ModelConfig
from scalelm.model.attention import document_mask
from scalelm.model.spec import Norm, padded_vocab_size

SCORE = "head.score"  # a classification head's weight (ScoreHead), by its single-process name
Activations = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""hidden (s, b, h), or (hidden, position_ids (b, s), document_ids (b, s)) for packed documents."""


def split(x: Activations) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(hidden, documents): documents is () or (position_ids, document_ids)."""
    return (x[0], tuple(x[1:])) if isinstance(x, tuple) else (x, ())


def join(hidden: torch.Tensor, documents: tuple[torch.Tensor, ...]) -> Activations:
    return (hidden, *documents) if documents else hidden


def recompute(function, x: Activations) -> Activations:
    """function(x) under full activation checkpointing (a block, or DeepSpeed's run of pipeline layers), through
    megatron's checkpoint, which replays the model-parallel RNG streams so recomputed dropout masks match.
    Only the hidden state is saved and recomputed from; the document tensors ride along unchanged."""
    hidden, documents = split(x)
    if not hidden.requires_grad:
        # NOTE: megatron's checkpoint is reentrant: its output needs a gradient only if its input does. Under
        # LoRA the first block's input comes from a frozen embedding, so it is made to, or nothing would train.
        hidden = hidden.detach().requires_grad_()
    out = tensor_parallel.checkpoint(lambda h: split(function(join(h, documents)))[0], False, hidden)
    return join(out, documents)


@contextmanager
def layer_seed(seed: int, index: int) -> Iterator[None]:
    """Build a layer under the seed of its index (embedding 0, blocks 1..L, norm L+1, head L+2),
    leaving the caller's RNG as it was."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed * 1_000_003 + index)
        yield


class Embedding(nn.Module):
    """input_ids (b, s) -> hidden (s, b, h): vocabulary-parallel word embedding, learned positions or none.

    With tied embeddings the same weight also makes the logits (`logits`), at the pipeline's end; the
    copy built there is made without the position table (`positions=False`), which it never uses."""

    def __init__(self, model: ModelConfig, tc: TransformerConfig, vocab_size: int, seed: int, positions: bool = True):
        super().__init__()
        with layer_seed(seed, 0):
            self.word = VocabParallelEmbedding(padded_vocab_size(vocab_size), model.hidden_size, init_method=tc.init_method, config=tc)
            zero_padding(self.word.weight, vocab_size)
            self.position = None
            if positions and model.position_embedding == "learned":
                self.position = nn.Embedding(model.max_position_embeddings, model.hidden_size)
                tc.init_method(self.position.weight)
        self.dropout = nn.Dropout(model.dropout)
        self.sequence_parallel = tc.sequence_parallel
        self.vocab_size = vocab_size  # the real one; the table holds it padded
        self.head = Head(model, tc, vocab_size, seed) if model.tie_embeddings else None  # holds no weight

    def logits(self, x: Activations) -> torch.Tensor:
        return self.head(x, weight=self.word.weight)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (b, s) at position_ids (b, s; default 0..s-1) -> hidden (s, b, h), whole, before dropout."""
        hidden = self.word(input_ids)  # (b, s, h)
        if self.position is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device) if position_ids is None else position_ids
            hidden = hidden + self.position(positions)
        return hidden.transpose(0, 1).contiguous()  # (s, b, h)

    def forward(self, inputs: Activations) -> Activations:
        """input_ids (b, s), or (input_ids, position_ids, document_ids) -> hidden (s, b, h) [+ the same documents]."""
        input_ids, documents = split(inputs)
        hidden = self.embed(input_ids, documents[0] if documents else None)
        if self.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)  # (s/tp, b, h)
            with tensor_parallel.get_cuda_rng_tracker().fork():  # each rank drops out its own part
                return join(self.dropout(hidden), documents)
        return join(self.dropout(hidden), documents)


class Block(nn.Module):
    """One megatron-core TransformerLayer (pre-norm attention + MLP, residuals), hidden -> hidden."""

    def __init__(self, model: ModelConfig, tc: TransformerConfig, spec: ModuleSpec, layer_number: int, seed: int,
                 packed_attention: str = "sdpa"):
        super().__init__()
        self.packed_attention = packed_attention  # the kernel for packed documents (model/attention.py)
        self.causal = model.causal
        with layer_seed(seed, layer_number):
            self.layer = build_module(spec, config=tc, layer_number=layer_number)
        self.rope = None
        if model.position_embedding == "rope":
            self.rope = RotaryEmbedding(tc.kv_channels, rotary_percent=1.0, rotary_base=model.rope_base,
                                        use_cpu_initialization=tc.use_cpu_initialization)
        self.sequence_factor = tc.tensor_model_parallel_size if tc.sequence_parallel else 1

    def forward(self, x: Activations) -> Activations:
        hidden, documents = split(x)
        # Attention sees the whole sequence even when the layer's input holds only this rank's part.
        seq_len = hidden.shape[0] * self.sequence_factor
        rotary = self.rotary(seq_len, documents[0] if documents else None)  # packed: each token's own position
        mask = None  # the whole window: causal, or for a bidirectional model every position (the layer spec's)
        if documents:
            mask = document_mask(documents[1], self.packed_attention, self.causal)
        if self.sequence_factor > 1:
            # each rank holds its own part of the sequence, so its dropout masks must be its own
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return join(self.layer(hidden, attention_mask=mask, rotary_pos_emb=rotary)[0], documents)
        return join(self.layer(hidden, attention_mask=mask, rotary_pos_emb=rotary)[0], documents)

    def rotary(self, length: int, position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """RoPE's angles for positions 0..length-1, (length, 1, 1, d), or with position_ids (b, length) each token's
        own, (length, b, 1, d); None without RoPE."""
        if self.rope is None:
            return None
        angles = self.rope(length)  # every position_id is below the length: a window's, or a decoding batch's slots
        return angles if position_ids is None else angles[:, 0][position_ids.t()]

    def cached(self, hidden: torch.Tensor, mask: torch.Tensor | None, rotary: torch.Tensor | None, cache) -> torch.Tensor:
        """hidden (s, b, h) of new tokens, whole (no sequence parallelism), after those in `cache` (megatron-core's
        StaticInferenceContext, which this layer's attention appends their keys and values to): mask (b, 1, s, t),
        True where a query may not see a key, t = the cached tokens and these, or None: causal when the cache is
        empty, else every key; rotary (t, b, 1, d), every slot's."""
        return self.layer(hidden, attention_mask=mask, rotary_pos_emb=rotary, inference_context=cache)[0]


class FinalNorm(nn.Module):
    """The norm after the last block."""

    def __init__(self, model: ModelConfig, tc: TransformerConfig, seed: int):
        super().__init__()
        with layer_seed(seed, model.num_layers + 1):
            self.norm = Norm(tc, model.hidden_size, eps=model.norm_eps)

    def forward(self, x: Activations) -> Activations:
        hidden, documents = split(x)
        return join(self.norm(hidden), documents)


class Head(nn.Module):
    """hidden (s, b, h) -> logits (s, b, V/tp), this rank's slice of the padded vocabulary; no bias.
    The padding's logits are -inf. With tied embeddings it holds no weight and is given the embedding's."""

    def __init__(self, model: ModelConfig, tc: TransformerConfig, vocab_size: int, seed: int):
        super().__init__()
        with layer_seed(seed, model.num_layers + 2):
            self.linear = ColumnParallelLinear(model.hidden_size, padded_vocab_size(vocab_size), config=tc,
                                               init_method=tc.init_method, bias=False, gather_output=False,
                                               skip_weight_param_allocation=model.tie_embeddings)
            if self.linear.weight is not None:
                zero_padding(self.linear.weight, vocab_size)
        self.vocab_size = vocab_size
        self.sequence_parallel = tc.sequence_parallel
        self.emit_hidden = False  # inside hidden_states()

    def forward(self, x: Activations, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.emit_hidden:
            return _whole(split(x)[0], self.sequence_parallel)
        logits, _ = self.linear(split(x)[0], weight=weight)  # (s, b, V/tp)
        width = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * width  # this rank's first vocabulary id
        if first + width > self.vocab_size:
            logits = _MaskPadding.apply(logits, max(0, self.vocab_size - first))
        return logits


class _MaskPadding(torch.autograd.Function):
    """logits[..., start:] = -inf in place, and their gradient 0: the padding columns only are written, where
    masked_fill would copy the logits, the step's largest tensor, forward and backward (16% of a tiny CPU step)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, start: int) -> torch.Tensor:
        ctx.start = start
        ctx.mark_dirty(logits)  # the linear layer's output, which its backward does not need
        logits[..., start:] = float("-inf")
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad[..., ctx.start:] = 0  # already 0 through a softmax; kept so, whatever the loss
        return grad, None


class ScoreHead(nn.Module):
    """hidden (s[/tp], b, h) -> scores (s, b, num_labels), a score for every position (the objective reads each
    document's last, objectives/documents.py): one linear layer without bias, Hugging Face's *ForSequenceClassification
    `score`, whole on every tensor rank (its input is the same on every rank). Under sequence parallelism each
    rank scores its part of the sequence and the parts are gathered; the weight's gradient then covers that
    part only, so it is marked `sequence_parallel` and summed over the tensor group (parallel/grads.py)."""

    def __init__(self, model: ModelConfig, tc: TransformerConfig, num_labels: int, seed: int):
        super().__init__()
        with layer_seed(seed, model.num_layers + 3):
            self.score = nn.Parameter(torch.empty(num_labels, model.hidden_size))
            tc.init_method(self.score)
        self.sequence_parallel = tc.sequence_parallel
        self.score.sequence_parallel = tc.sequence_parallel
        self.emit_hidden = False  # inside hidden_states()

    def forward(self, x: Activations) -> torch.Tensor:
        if self.emit_hidden:
            return _whole(split(x)[0], self.sequence_parallel)
        scores = torch.nn.functional.linear(split(x)[0], self.score)  # (s[/tp], b, num_labels)
        if self.sequence_parallel:  # (s/tp, b, n) -> (s, b, n); each rank's gradient is its own part's
            scores = tensor_parallel.gather_from_sequence_parallel_region(scores, tensor_parallel_output_grad=False)
        return scores


@contextmanager
def hidden_states(model: nn.Module) -> Iterator[None]:
    """Inside the block `model` (a GPT, or a pipeline stage of its layers) ends before its head: it returns the
    final norm's output, (s, b, h), whole along the sequence under sequence parallelism too."""
    ends = [m for m in model.modules() if isinstance(m, (Head, ScoreHead))]
    for end in ends:
        end.emit_hidden = True
    try:
        yield
    finally:
        for end in ends:
            end.emit_hidden = False


def _whole(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """(s[/tp], b, h) -> (s, b, h): under sequence parallelism the tensor ranks' parts gathered."""
    if not sequence_parallel:
        return hidden
    return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)


def zero_padding(weight: torch.Tensor, vocab_size: int) -> None:
    """Zero this tensor rank's rows of a (V_pad/tp, h) table that lie beyond the vocabulary. Their logits are
    masked, so their gradient is zero and AdamW leaves them at zero: exports drop nothing that is not zero."""
    first = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    with torch.no_grad():
        weight[max(0, vocab_size - first):].zero_()


class GPT(nn.Module):
    """The layers in order, for runs without pipeline parallelism: token ids in, logits out."""

    def __init__(self, model: ModelConfig, tc: TransformerConfig, spec: ModuleSpec, vocab_size: int, seed: int,
                 recompute_blocks: bool = False, packed_attention: str = "sdpa", num_labels: int | None = None):
        super().__init__()
        self.recompute_blocks = recompute_blocks  # full activation checkpointing: keep only block inputs
        self.embedding = Embedding(model, tc, vocab_size, seed)
        self.blocks = nn.ModuleList(Block(model, tc, spec, i, seed, packed_attention)
                                    for i in range(1, model.num_layers + 1))
        self.norm = FinalNorm(model, tc, seed)
        self.head = (ScoreHead(model, tc, num_labels, seed) if num_labels
                     else None if model.tie_embeddings else Head(model, tc, vocab_size, seed))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (b, s) -> logits (s, b, V/tp), the padding -inf (with `num_labels`: scores (s, b, num_labels),
        ScoreHead's). With position_ids and document_ids
        (b, s), each document of a packed window is attended to, and positioned, on its own."""
        if (position_ids is None) != (document_ids is None):
            raise ValueError("packed documents need both position_ids and document_ids")
        x = self.embedding(input_ids if position_ids is None else (input_ids, position_ids, document_ids))
        for block in self.blocks:
            x = recompute(block, x) if self.recompute_blocks else block(x)
        return self.logits(self.norm(x))

    def logits(self, x: Activations) -> torch.Tensor:
        """The head on the final norm's output: logits (s, b, V/tp), or a classification head's scores."""
        return self.embedding.logits(x) if self.head is None else self.head(x)
