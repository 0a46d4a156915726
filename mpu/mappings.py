"""Communication in and out of the model-parallel region, in three layers (Megatron's ``mappings.py``):

1. private collectives (``_reduce``, ``_split_last_dim``, ``_gather_last_dim``) that return early on one rank;
2. autograd Functions pairing each forward with its conjugate backward;
3. public functions named after the region they act on, each documented "forward: X, backward: Y".

Every public function takes an optional ``group``; None means this rank's model-parallel group
(:func:`mpu.initialize.get_model_parallel_group`), which is itself None (size 1) when mpu is not initialised.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .initialize import group_rank, group_world_size, resolve_group


def _reduce(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """All-reduce (sum) ``x`` over ``group``; identity on one rank."""
    if group_world_size(group) == 1:
        return x
    # Reduce a copy: the input may be saved for another op's backward, so it must not change in place.
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split_last_dim(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Keep this rank's contiguous slice of the last dim: ``[..., D] -> [..., D/p]``."""
    world_size = group_world_size(group)
    if world_size == 1:
        return x
    if x.size(-1) % world_size != 0:
        raise ValueError(f"last dimension {x.size(-1)} is not divisible by the group size {world_size}")
    part = x.size(-1) // world_size
    return x.narrow(-1, group_rank(group) * part, part).contiguous()


def _gather_last_dim(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenate the ranks' tensors along the last dim: ``[..., D/p] -> [..., D]`` (rank order)."""
    world_size = group_world_size(group)
    if world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _reduce(grad, ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None


def copy_to_model_parallel_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """forward: identity, backward: all-reduce (sum) of the gradient over the MP group."""
    group = resolve_group(group)
    if group_world_size(group) == 1:  # both directions are the identity: skip the autograd node (decode steps)
        return x
    return _CopyToModelParallelRegion.apply(x, group)


def reduce_from_model_parallel_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """forward: all-reduce (sum) over the MP group, backward: identity."""
    group = resolve_group(group)
    if group_world_size(group) == 1:
        return x
    return _ReduceFromModelParallelRegion.apply(x, group)


def scatter_to_model_parallel_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """forward: keep this rank's slice of the last dim ``[..., D] -> [..., D/p]``, backward: all-gather it."""
    group = resolve_group(group)
    if group_world_size(group) == 1:
        return x
    return _ScatterToModelParallelRegion.apply(x, group)


def gather_from_model_parallel_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """forward: all-gather along the last dim ``[..., D/p] -> [..., D]``, backward: keep this rank's slice."""
    group = resolve_group(group)
    if group_world_size(group) == 1:
        return x
    return _GatherFromModelParallelRegion.apply(x, group)
