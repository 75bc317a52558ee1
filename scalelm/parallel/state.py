"""The training state of this rank as whole, layout-free tensors, and back: what makes checkpoints reshardable.

Every parameter is known by its single-process name, as the model declares it (model/build.py:
`embedding.word.weight`, `blocks.3.layer.mlp.linear_fc1.weight`, `norm.norm.weight`, ...). For each one the state
is fp32 tensors of the whole, unsharded shape:

    param        the fp32 master weight (the parameter itself when training in fp32)
    exp_avg      the optimizer's per-parameter states, as its factory names them (AdamW: its first and second
    exp_avg_sq   moments)

`gather` assembles one of them on this rank: DeepSpeed's tensor-fragment API undoes ZeRO's partitioning over the
data-parallel group, then `gather_tensor_parallel` undoes megatron's split over the tensor group. `scatter` is the
reverse: it cuts this rank's tensor-parallel slice out of a whole tensor and hands it to DeepSpeed, which keeps
its own data-parallel part (and, for the weight, sets the training-precision copy the forward pass uses too). A
state gathered under one layout therefore scatters into any other, and into the same one bit for bit.

A frozen parameter (LoRA's base) has only its weight: no master copy, no optimizer state (`states`).

Both are collective: every rank of a pipeline stage calls them for the same parameters in the same order, which
the model's declared names guarantee.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from deepspeed import zero
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from megatron.core import parallel_state

from scalelm import compat
from scalelm.parallel.gather import gather_tensor_parallel, tensor_parallel_slice


class OptimizerFactory(Protocol):
    """What the engine is handed to train with (train/optim.py's AdamW): it builds the torch optimizer of a module,
    names the per-parameter states the optimizer keeps (each the parameter's shape), and makes and counts them."""

    states: tuple[str, ...]

    def __call__(self, module: torch.nn.Module) -> torch.optim.Optimizer: ...

    def empty_state(self, param: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict: ...

    def steps(self, state: dict) -> int: ...

    def set_steps(self, state: dict, steps: int) -> None: ...


def states(param: torch.nn.Parameter, factory: OptimizerFactory | None) -> tuple[str, ...]:
    """The states `param` has: its weight and the optimizer's when it trains, its weight alone when it is frozen."""
    return ("param", *factory.states) if param.requires_grad and factory is not None else ("param",)


def gather(param: torch.nn.Parameter, key: str, optimizer, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole fp32 `key` state of `param` (collective over its data- and tensor-parallel groups); into `out`
    when given (fp32, the whole shape, on any device), which is then returned."""
    group = parallel_state.get_tensor_model_parallel_group()
    if out is not None and out.device == param.device and param.requires_grad and compat.in_fragments(param) \
            and (dist.get_world_size(group) == 1 or not getattr(param, "tensor_model_parallel", False)):
        return _gather_fragments(param, key, out)
    if not param.requires_grad:  # frozen: the weight alone, which ZeRO-3 still partitions
        if key != "param":
            raise ValueError("a frozen parameter has no optimizer state")
        if compat.zero3_partitioned(param):
            with zero.GatheredParameters([param]):
                value = param.detach().clone()
        else:
            value = param.detach()
    elif compat.has_master(param):
        value = safe_get_full_fp32_param(param) if key == "param" else safe_get_full_optimizer_state(param, key)
    else:  # fp32 without ZeRO: the torch optimizer updates the parameter itself
        value = param.detach() if key == "param" else _torch_state(optimizer, param)[key]
    whole = gather_tensor_parallel(value.float(), param, group)
    return whole if out is None else out.copy_(whole, non_blocking=True)


def _gather_fragments(param: torch.nn.Parameter, key: str, out: torch.Tensor) -> torch.Tensor:
    """What deepspeed.utils.safe_get_full_fp32_param / safe_get_full_optimizer_state do under ZeRO-1/2 and the
    bf16 optimizer (each data-parallel rank's fragment put in place, then summed over the group), into `out`
    instead of a new tensor: a checkpoint's snapshot lands in memory already touched, in one copy (8 GB/s here,
    against 1-3 GB/s for DeepSpeed's newly allocated, zero-filled tensor and the copy after it)."""
    (address, read, group), flat = compat.fragment(param), out.view(-1)
    dp = dist.get_world_size(group)
    if dp > 1 and (address is None or address[1] < flat.numel()):
        flat.zero_()
    if address is not None:
        flat.narrow(0, *address).copy_(read(None if key == "param" else key))
    if dp > 1:
        dist.all_reduce(flat, group=group)
    return out


def whole_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The shape `gather` returns for `param`: unpartitioned by ZeRO-3 and by the tensor group."""
    shape = list(compat.whole_shape(param))
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return tuple(shape)


def scatter(param: torch.nn.Parameter, key: str, whole: torch.Tensor, optimizer) -> None:
    """Set the `key` state of `param` from its whole fp32 value (collective under ZeRO-3)."""
    if compat.zero3_partitioned(param) and whole.numel() % parallel_state.get_data_parallel_world_size():
        # NOTE: DeepSpeed 0.19.8's ZeRO-3 cuts a whole value into equal parts and would read past its end
        raise ValueError(f"ZeRO-3 cannot load {whole.numel()} values over {parallel_state.get_data_parallel_world_size()} "
                         f"data-parallel ranks: use a data-parallel size that divides it, or ZeRO-1/2")
    mine = tensor_parallel_slice(whole, param, parallel_state.get_tensor_model_parallel_group())
    mine = mine.to(device=param.device, dtype=torch.float32)
    if key == "param":
        _set_weight(param, mine)
    if not param.requires_grad:
        if key != "param":
            raise ValueError("a frozen parameter has no optimizer state")
    elif not compat.has_master(param):
        if key != "param":
            _torch_state(optimizer, param)[key].copy_(mine)
    elif key == "param":
        safe_set_full_fp32_param(param, mine)
    else:
        safe_set_full_optimizer_state(param, mine, key)


def init_optimizer_state(optimizer, factory: OptimizerFactory) -> None:
    """Create the optimizer's state now instead of at the first step (the factory's `empty_state`, exactly what a
    fresh optimizer would create), so that a checkpoint can be loaded into it."""
    inner = _torch_optimizer(optimizer)
    flat = compat.flat_partitions(optimizer)  # ZeRO-3 hands the optimizer one flat sub-group at a time
    params = flat if flat is not None else [p for group in inner.param_groups for p in group["params"]]
    for p in params:
        if not inner.state[p]:
            inner.state[p] = factory.empty_state(p, inner)
    compat.link_optimizer_state(optimizer)


def optimizer_steps(optimizer, factory: OptimizerFactory | None) -> int:
    """The optimizer's step count; every parameter group has taken the same steps (0 without an optimizer)."""
    if factory is None:
        return 0
    steps = {factory.steps(state) for state in _torch_optimizer(optimizer).state.values() if state}
    if len(steps) > 1:
        raise RuntimeError(f"the optimizer's parameter groups disagree on their step count: {sorted(steps)}")
    return steps.pop() if steps else 0


def set_optimizer_steps(optimizer, factory: OptimizerFactory | None, steps: int) -> None:
    if factory is None:
        return
    for state in _torch_optimizer(optimizer).state.values():
        if state:
            factory.set_steps(state, steps)


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO or bf16 wrapper (its public `optimizer`), or the one given."""
    return getattr(optimizer, "optimizer", optimizer)


def _torch_state(optimizer, param: torch.nn.Parameter) -> dict:
    return _torch_optimizer(optimizer).state[param]


def _set_weight(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set the weight the forward pass uses, in its own precision. Under ZeRO-3 it is gathered first;
    on leaving the context the first data-parallel rank's value (every rank's is the same) is
    partitioned again."""
    if compat.zero3_partitioned(param):
        with zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value)
    else:
        param.data.copy_(value)
