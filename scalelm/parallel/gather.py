"""Whole tensors from tensor-parallel shards and back: megatron-core's split of a weight, both ways.

megatron splits a master weight along `partition_dim` into world * stride chunks and gives rank r
the chunks r, r + world, r + 2 * world, ... (stride 2 keeps a SwiGLU rank's [gate, up] halves
together). Gathering every rank's shard and putting the chunks back in order gives the weight a
single process would hold.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_tensor_parallel(tensor: torch.Tensor, param: torch.nn.Parameter, group) -> torch.Tensor:
    """`tensor` (the parameter itself or its gradient) whole, gathered over the tensor-parallel `group`."""
    world = dist.get_world_size(group)
    if world == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = [shard.chunk(stride, dim=dim) for shard in shards]  # chunks[rank][j] is master chunk j * world + rank
    return torch.cat([chunks[k % world][k // world] for k in range(world * stride)], dim=dim)


def tensor_parallel_slice(whole: torch.Tensor, param: torch.nn.Parameter, group) -> torch.Tensor:
    """This rank's part of a whole tensor, cut as megatron cuts a master weight (the inverse of gather_tensor_parallel)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1 or not getattr(param, "tensor_model_parallel", False):
        return whole
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = whole.chunk(world * stride, dim=dim)
    return torch.cat([chunks[j * world + rank] for j in range(stride)], dim=dim)
