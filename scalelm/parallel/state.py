"""The training state of this rank as whole, layout-free tensors, and back: what makes checkpoints reshardable.

Every parameter is known by its single-process name, as `GPT.named_parameters()` has it
(`embedding.word.weight`, `blocks.3.layer.mlp.linear_fc1.weight`, `norm.norm.weight`, ...). For
each one the state is three fp32 tensors of the whole, unsharded shape:

    param        the fp32 master weight (the parameter itself when training in fp32)
    exp_avg      AdamW's first moment
    exp_avg_sq   AdamW's second moment

`gather` assembles one of them on this rank: DeepSpeed's tensor-fragment API undoes ZeRO's
partitioning over the data-parallel group, then `gather_tensor_parallel` undoes megatron's split
over the tensor group. `scatter` is the reverse: it cuts this rank's tensor-parallel slice out of a
whole tensor and hands it to DeepSpeed, which keeps its own data-parallel part (and, for the
weight, sets the training-precision copy the forward pass uses too). A state gathered under one
layout therefore scatters into any other, and into the same one bit for bit.

A frozen parameter (LoRA's base) has only its weight: no master copy, no moments (`states`).

Both are collective: every rank of a pipeline stage calls them for the same parameters in the same
order, which `named_parameters` guarantees.
"""

from __future__ import annotations

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

from scalelm.parallel.gather import gather_tensor_parallel, tensor_parallel_slice

KEYS = ("param", "exp_avg", "exp_avg_sq")


def named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters, frozen ones too, under their single-process names, in a fixed order."""
    return [(single_process_name(name), p) for name, p in module.named_parameters()]


def states(param: torch.nn.Parameter) -> tuple[str, ...]:
    """The states `param` has: all KEYS when it trains, its weight alone when it is frozen."""
    return KEYS if param.requires_grad else KEYS[:1]


def single_process_name(name: str) -> str:
    """A parameter's name as `GPT` has it; a PipelineModule's '3.layer.x' becomes 'blocks.2.layer.x'."""
    if name.startswith("tied_modules.embedding."):
        return "embedding." + name.removeprefix("tied_modules.embedding.")
    index, _, rest = name.partition(".")
    if not index.isdigit():
        return name
    index = int(index)
    if index == 0:
        return f"embedding.{rest}"
    kind = rest.split(".")[0]
    return {"layer": f"blocks.{index - 1}.{rest}", "norm": f"norm.{rest}", "linear": f"head.{rest}",
            "score": f"head.{rest}"}[kind]


def gather(param: torch.nn.Parameter, key: str, optimizer, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole fp32 `key` state of `param` (collective over its data- and tensor-parallel groups); into `out`
    when given (fp32, the whole shape, on any device), which is then returned."""
    group = parallel_state.get_tensor_model_parallel_group()
    if out is not None and out.device == param.device and param.requires_grad and _zero12(param) \
            and (dist.get_world_size(group) == 1 or not getattr(param, "tensor_model_parallel", False)):
        return _gather_fragments(param, key, out)
    if not param.requires_grad:  # frozen: the weight alone, which ZeRO-3 still partitions
        if key != "param":
            raise ValueError("a frozen parameter has no optimizer state")
        if hasattr(param, "ds_id"):
            with zero.GatheredParameters([param]):
                value = param.detach().clone()
        else:
            value = param.detach()
    elif _owned_by_deepspeed(param):
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
    mapping, flat = param._hp_mapping, out.view(-1)
    dp = dist.get_world_size(param._dp_group)
    if dp > 1 and (mapping is None or mapping.lp_fragment_address.numel < flat.numel()):
        flat.zero_()
    if mapping is not None:
        address = mapping.lp_fragment_address
        flat.narrow(0, address.start, address.numel).copy_(mapping.get_hp_fragment(None if key == "param" else key))
    if dp > 1:
        dist.all_reduce(flat, group=param._dp_group)
    return out


def whole_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The shape `gather` returns for `param`: unpartitioned by ZeRO-3 and by the tensor group."""
    shape = list(getattr(param, "ds_shape", param.shape))
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return tuple(shape)


def scatter(param: torch.nn.Parameter, key: str, whole: torch.Tensor, optimizer) -> None:
    """Set the `key` state of `param` from its whole fp32 value (collective under ZeRO-3)."""
    if hasattr(param, "ds_id") and whole.numel() % parallel_state.get_data_parallel_world_size():
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
    elif not _owned_by_deepspeed(param):
        if key != "param":
            _torch_state(optimizer, param)[key].copy_(mine)
    elif key == "param":
        safe_set_full_fp32_param(param, mine)
    else:
        safe_set_full_optimizer_state(param, mine, key)


def init_optimizer_state(optimizer) -> None:
    """Create AdamW's state (step 0, zero moments) now instead of at the first step, so that a
    checkpoint can be loaded into it. A fresh AdamW would create exactly this state itself."""
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wrappers hold the torch AdamW
    # ZeRO-3 hands AdamW one flat sub-group at a time, so its groups are empty between steps
    flat = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    params = flat if flat is not None else [p for group in inner.param_groups for p in group["params"]]
    scalar_on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    for p in params:
        if not inner.state[p]:
            inner.state[p] = {"step": torch.zeros((), device=p.device if scalar_on_device else "cpu"),
                              "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                              "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    # DeepSpeed links each parameter's fragment to the optimizer state at the first step; link now.
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def optimizer_steps(optimizer) -> int:
    """AdamW's step count (the bias correction's t); every parameter group has taken the same steps."""
    inner = getattr(optimizer, "optimizer", optimizer)
    steps = {int(state["step"]) for state in inner.state.values() if "step" in state}
    if len(steps) > 1:
        raise RuntimeError(f"AdamW parameter groups disagree on their step count: {sorted(steps)}")
    return steps.pop() if steps else 0


def set_optimizer_steps(optimizer, steps: int) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        state["step"].fill_(steps)


def _owned_by_deepspeed(param: torch.nn.Parameter) -> bool:
    """True when DeepSpeed keeps an fp32 master (ZeRO 1-3, or the bf16 optimizer) for `param`."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _zero12(param: torch.nn.Parameter) -> bool:
    """True when DeepSpeed keeps `param`'s fp32 master in fragments (ZeRO-1/2, or the bf16 optimizer)."""
    return hasattr(param, "_hp_mapping") and not hasattr(param, "ds_id")


def _torch_state(optimizer, param: torch.nn.Parameter) -> dict:
    return getattr(optimizer, "optimizer", optimizer).state[param]


def _set_weight(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set the weight the forward pass uses, in its own precision. Under ZeRO-3 it is gathered first;
    on leaving the context the first data-parallel rank's value (every rank's is the same) is
    partitioned again."""
    if hasattr(param, "ds_id"):
        with zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value)
    else:
        param.data.copy_(value)
