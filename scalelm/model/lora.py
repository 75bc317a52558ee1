"""LoRA: low-rank adapters on megatron-core's parallel linears, applied to a built model from outside.

    Y = W X + b + scale · B A dropout(X)        A (r, in), B (out, r), scale = alpha / r (rsLoRA: alpha / sqrt r)

The base is frozen (no gradient, so no optimizer state and no weight decay), except a classification head's
`score`, which is new to the base and trains whole (WHOLE); A starts as nn.Linear's weights
do (uniform, ±1/sqrt(in)) and B at zero, so training starts from the base model exactly. An adapter is a
child `lora` of the linear it adapts (`blocks.3.layer.self_attention.linear_qkv.lora.a`), added to its output
by a forward hook, and split over tensor ranks the way its base is:

    column-parallel base (qkv, fc1)   W = [W_1; ...; W_t] by output rows
        A whole on every rank; B = [B_1; ...; B_t] by output rows, with W's stride (SwiGLU's [gate; up])
        the A path reads the whole input: under sequence parallelism X is gathered along the sequence
        (its gradient is then split back, not summed: each rank's A path already gives the whole gradient
        once A X's gradient is summed over the tensor group, as `copy_to_tensor_model_parallel_region` does)
    row-parallel base (proj, fc2)     W = [W_1, ..., W_t] by input columns, input X = [X_1; ...; X_t]
        A = [A_1, ..., A_t] by input columns; A X = Σ_i A_i X_i is summed over the tensor group (under
        sequence parallelism reduce-scattered along the sequence, as the base's output is); B whole on
        every rank (under sequence parallelism each rank's gradient of B covers its part of the sequence,
        so B is marked `sequence_parallel` and summed like the norms: parallel/grads.py)

So every adapter has megatron's partition attributes and is gathered, scattered and resharded exactly as
the base's weights are (parallel/state.py), and whole adapters merge into whole weights: W + scale · B A.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from scalelm.config import LoRAConfig
from scalelm.model.gpt import SCORE

# each target of finetune.lora.targets (config/finetune.py): the linear inside a megatron TransformerLayer it adapts
TARGETS = {"qkv": "self_attention.linear_qkv", "proj": "self_attention.linear_proj",
           "fc1": "mlp.linear_fc1", "fc2": "mlp.linear_fc2"}
SUFFIXES = (".lora.a", ".lora.b")


def scale(lora: LoRAConfig) -> float:
    return lora.alpha / (math.sqrt(lora.rank) if lora.rslora else lora.rank)


def is_adapter(name: str) -> bool:
    return name.endswith(SUFFIXES)


# trained whole beside the adapters: a classification head (finetune.head), new to the base (PEFT's modules_to_save)
WHOLE = (SCORE,)


def is_trained(name: str) -> bool:
    """What a LoRA run trains and its checkpoint holds, by single-process name: the adapters and WHOLE."""
    return is_adapter(name) or name in WHOLE


def adapted(name: str) -> str:
    """The weight an adapter's tensor belongs to: 'x.linear_qkv.lora.a' -> 'x.linear_qkv.weight'."""
    return name.rsplit(".lora.", 1)[0] + ".weight"


class LoRA(nn.Module):
    """The low-rank path of one parallel linear: input X as the base sees it -> scale · B A X in the base's
    output layout. See the module docstring for how it is split."""

    def __init__(self, base: nn.Module, lora: LoRAConfig, generator: torch.Generator):
        super().__init__()
        self.column = isinstance(base, ColumnParallelLinear)
        if not self.column and not isinstance(base, RowParallelLinear):
            raise TypeError(f"LoRA adapts megatron's ColumnParallelLinear and RowParallelLinear, not {type(base).__name__}")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        self.sequence_parallel = base.sequence_parallel and tp > 1
        self.enabled = True  # off inside `adapters_off`
        self.scale = scale(lora)
        self.dropout = nn.Dropout(lora.dropout) if lora.dropout > 0 else None
        r, fan_in = lora.rank, base.input_size
        whole_a = (torch.rand(r, fan_in, generator=generator) * 2 - 1) / math.sqrt(fan_in)  # nn.Linear's init
        if self.column:
            self.a = nn.Parameter(whole_a)
            self.b = nn.Parameter(torch.zeros(base.output_size_per_partition, r))
            stride = getattr(base.weight, "partition_stride", 1)
            tensor_parallel.set_tensor_model_parallel_attributes(self.b, True, 0, stride)
        else:
            self.a = nn.Parameter(whole_a.chunk(tp, dim=1)[rank].clone())
            tensor_parallel.set_tensor_model_parallel_attributes(self.a, True, 1, 1)
            self.b = nn.Parameter(torch.zeros(base.output_size, r))
            self.b.sequence_parallel = self.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.column:
            if self.sequence_parallel:  # (s/tp, b, in) -> (s, b, in); its gradient is split back, not summed
                x = self._dropout(x, own=True)  # each rank's part of the sequence
                x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            else:
                x = self._dropout(x, own=False)
            h = tensor_parallel.copy_to_tensor_model_parallel_region(F.linear(x, self.a))  # (s, b, r), whole
            return F.linear(h, self.b) * self.scale  # (s, b, out/tp)
        x = self._dropout(x, own=True)  # each rank's columns
        h = F.linear(x, self.a)  # (s, b, r): this rank's share of the sum over input columns
        h = (tensor_parallel.reduce_scatter_to_sequence_parallel_region(h) if self.sequence_parallel  # (s/tp, b, r)
             else tensor_parallel.reduce_from_tensor_model_parallel_region(h))  # (s, b, r)
        return F.linear(h, self.b) * self.scale  # (s[/tp], b, out)

    def _dropout(self, x: torch.Tensor, own: bool) -> torch.Tensor:
        """Dropout of the adapter's input. `own`: this rank's part of a split tensor, with a mask of its own (the
        model-parallel RNG stream); otherwise the input is the same on every tensor rank and so is the mask.
        NOTE: that one is drawn from the default stream, which megatron keeps equal over a tensor group (as its
        own dropout outside sequence parallelism relies on): a mask that differed would let A's copies drift."""
        if self.dropout is None:
            return x
        if not own:
            return self.dropout(x)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.dropout(x)


def _add_adapter(linear: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: the linear's (output, bias) with the adapter's term added to the output (unless switched off)."""
    if not linear.lora.enabled:
        return output
    x = args[0] if args else kwargs["input_"]
    out, bias = output
    return out + linear.lora(x), bias


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRA) for m in model.modules())


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model alone inside the block: every adapter of `model` switched off (DPO's reference for LoRA)."""
    adapters = [m for m in model.modules() if isinstance(m, LoRA)]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def apply_lora(model: nn.Module, lora: LoRAConfig, seed: int) -> nn.Module:
    """Freeze every weight of `model` (a GPT or a PipelineModule of its layers) but a classification head's and
    adapt the `lora.targets` of each transformer layer it holds. Each adapter's A is drawn whole from (seed, layer,
    target) alone, so every layout starts from the single-process adapters. Returns `model`."""
    from scalelm.model.gpt import Block, ScoreHead

    for module in model.modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(isinstance(module, ScoreHead))
    for block in (m for m in model.modules() if isinstance(m, Block)):
        layer = block.layer.layer_number
        for index, target in enumerate(TARGETS):
            if target not in lora.targets:
                continue
            linear = block.layer.get_submodule(TARGETS[target])
            generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 16 + index + 7)
            linear.lora = LoRA(linear, lora, generator)
            linear.register_forward_hook(_add_adapter, with_kwargs=True)
    return model


def merge(weights: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """Whole base weights with whole adapters merged in: W + scale · B A for each adapted weight. A classification
    head among `adapters` (WHOLE) replaces the base's language-model head."""
    whole = {name: t for name, t in adapters.items() if name in WHOLE}
    merged = {name: t for name, t in weights.items() if not (whole and name.startswith("head."))} | whole
    for name in adapters:
        if name.endswith(".lora.a"):
            weight = adapted(name)
            a, b = adapters[name], adapters[name.removesuffix(".a") + ".b"]
            merged[weight] = weights[weight] + scale(lora) * (b.double() @ a.double()).to(weights[weight].dtype)
    return merged
