"""The GPT decoder as a list of layers: embedding, megatron-core TransformerLayers, final norm, head.

    input_ids (b, s) ─Embedding─▶ (s, b, h) ─Block × L─▶ (s, b, h) ─FinalNorm─▶ ─Head─▶ logits (s, b, V/tp)
    loss = mean over tokens of vocab_parallel_cross_entropy(logits, labels)

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
from typing import Iterator

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from scalelm.config import ModelConfig
from scalelm.model.spec import Norm, padded_vocab_size


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
        self.head = Head(model, tc, vocab_size, seed) if model.tie_embeddings else None  # holds no weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, weight=self.word.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.word(input_ids)  # (b, s, h)
        if self.position is not None:
            hidden = hidden + self.position(torch.arange(input_ids.shape[1], device=input_ids.device))
        hidden = hidden.transpose(0, 1).contiguous()  # (s, b, h)
        if self.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)  # (s/tp, b, h)
            with tensor_parallel.get_cuda_rng_tracker().fork():  # each rank drops out its own part
                return self.dropout(hidden)
        return self.dropout(hidden)


class Block(nn.Module):
    """One megatron-core TransformerLayer (pre-norm attention + MLP, residuals), hidden -> hidden."""

    def __init__(self, model: ModelConfig, tc: TransformerConfig, spec: ModuleSpec, layer_number: int, seed: int):
        super().__init__()
        with layer_seed(seed, layer_number):
            self.layer = build_module(spec, config=tc, layer_number=layer_number)
        self.rope = None
        if model.position_embedding == "rope":
            self.rope = RotaryEmbedding(tc.kv_channels, rotary_percent=1.0, rotary_base=model.rope_base,
                                        use_cpu_initialization=tc.use_cpu_initialization)
        self.sequence_factor = tc.tensor_model_parallel_size if tc.sequence_parallel else 1

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Attention sees the whole sequence even when the layer's input holds only this rank's part.
        rotary = self.rope(hidden.shape[0] * self.sequence_factor) if self.rope is not None else None
        if self.sequence_factor > 1:
            # each rank holds its own part of the sequence, so its dropout masks must be its own
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.layer(hidden, attention_mask=None, rotary_pos_emb=rotary)[0]
        return self.layer(hidden, attention_mask=None, rotary_pos_emb=rotary)[0]


class FinalNorm(nn.Module):
    """The norm after the last block."""

    def __init__(self, model: ModelConfig, tc: TransformerConfig, seed: int):
        super().__init__()
        with layer_seed(seed, model.num_layers + 1):
            self.norm = Norm(tc, model.hidden_size, eps=model.norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


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

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        logits, _ = self.linear(hidden, weight=weight)  # (s, b, V/tp)
        width = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * width  # this rank's first vocabulary id
        if first + width > self.vocab_size:
            padding = torch.arange(first, first + width, device=logits.device) >= self.vocab_size
            logits = logits.masked_fill(padding, float("-inf"))
        return logits


def zero_padding(weight: torch.Tensor, vocab_size: int) -> None:
    """Zero this tensor rank's rows of a (V_pad/tp, h) table that lie beyond the vocabulary. Their logits are
    masked, so their gradient is zero and AdamW leaves them at zero: exports drop nothing that is not zero."""
    first = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    with torch.no_grad():
        weight[max(0, vocab_size - first):].zero_()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; logits (s, b, V/tp) split over tensor ranks, labels (b, s)."""
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())  # (s, b)
    return losses.mean()


class GPT(nn.Module):
    """The layers in order with the loss on top, for runs without pipeline parallelism."""

    def __init__(self, model: ModelConfig, tc: TransformerConfig, spec: ModuleSpec, vocab_size: int, seed: int,
                 recompute_blocks: bool = False):
        super().__init__()
        self.recompute_blocks = recompute_blocks  # full activation checkpointing: keep only block inputs
        self.embedding = Embedding(model, tc, vocab_size, seed)
        self.blocks = nn.ModuleList(Block(model, tc, spec, i, seed) for i in range(1, model.num_layers + 1))
        self.norm = FinalNorm(model, tc, seed)
        self.head = None if model.tie_embeddings else Head(model, tc, vocab_size, seed)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.logits(input_ids), labels)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (b, s) -> logits (s, b, V/tp), the padding -inf."""
        hidden = self.embedding(input_ids)
        for block in self.blocks:
            # megatron's checkpoint replays the RNG streams, so recomputed dropout masks match
            hidden = tensor_parallel.checkpoint(block, False, hidden) if self.recompute_blocks else block(hidden)
        hidden = self.norm(hidden)
        return self.embedding.logits(hidden) if self.head is None else self.head(hidden)
