"""Tensor-parallel layers (Megatron's ``layers.py``, without biases: CPM-2 has none).

Initialisation builds the full master weight on CPU from the global torch RNG, then keeps this rank's (strided)
slice, so the same seed gives the same full weights at any MP size (SPEC §2 "Init").

Every layer computes in the dtype of its input: the weight is cast with ``weight.to(x.dtype)`` (a no-op in the
usual case). The model relies on this to run one matmul (the FF ``wo``) in fp32 under fp16. The matmul itself is
:func:`mpu.fast_linear.linear` (``F.linear``, through oneDNN on CPU fp32: see that module for why).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .fast_linear import linear
from .initialize import group_rank, group_world_size, resolve_group
from .mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from .utils import divide, vocab_range

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def init_method_normal(std: float) -> InitMethod:
    """In-place N(0, std) initialiser."""
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)
    return init_


def mark_model_parallel(weight: torch.Tensor, *, partition_dim: int, stride: int = 1) -> None:
    """Tag a split weight the way Megatron and DeepSpeed expect (`model_parallel` / `tensor_model_parallel`).

    DeepSpeed's gradient-norm clipping sums the squares of tagged (split) parameters on every MP rank but of
    untagged (replicated) ones on MP rank 0 only; untagged split weights would be under-counted and replicated
    norms over-counted, so clipping (and the loss curve) would differ from MP 1.
    """
    weight.model_parallel = True
    weight.tensor_model_parallel = True
    weight.partition_dim = partition_dim
    weight.partition_stride = stride


@torch.no_grad()
def initialize_parallel_weight(
    weight: torch.Tensor,
    full_shape: tuple[int, ...],
    *,
    partition_dim: int,
    init_method: InitMethod,
    stride: int = 1,
    group: Optional[dist.ProcessGroup] = None,
) -> None:
    """Fill ``weight`` (this rank's shard) with its slice of a freshly initialised full master weight.

    The master ``full_shape`` is split along ``partition_dim`` into ``stride * p`` equal chunks; rank r keeps
    chunks ``r, r + p, r + 2p, ...`` concatenated. For a fused ``[Q; K; V]`` weight with stride 3 this gives rank r
    ``[Q_r; K_r; V_r]``. The master is drawn with the global CPU RNG whatever the MP size, so every rank (and every
    MP size) consumes the RNG identically.
    """
    group = resolve_group(group)
    world_size, rank = group_world_size(group), group_rank(group)
    mark_model_parallel(weight, partition_dim=partition_dim, stride=stride)
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    if world_size > 1:
        chunk = divide(full_shape[partition_dim], stride * world_size, what=f"dimension {partition_dim} of {full_shape}")
        chunks = torch.split(master, chunk, dim=partition_dim)  # stride * p chunks
        master = torch.cat(chunks[rank::world_size], dim=partition_dim)
    if tuple(master.shape) != tuple(weight.shape):
        raise ValueError(f"shard shape {tuple(weight.shape)} does not match the slice {tuple(master.shape)} of "
                         f"{full_shape} at MP size {world_size}")
    weight.copy_(master)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocab) are split contiguously: rank r owns ids ``[r*V/p, (r+1)*V/p)``.

    forward: ids ``[*]`` (long, in [0, V)) -> vectors ``[*, d]``; ids outside this rank's range contribute zeros
    and the partial results are all-reduced over the group.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: InitMethod,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.group = resolve_group(group)
        world_size, rank = group_world_size(self.group), group_rank(self.group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, rank, world_size)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, embedding_dim))
        initialize_parallel_weight(self.weight, (num_embeddings, embedding_dim), partition_dim=0,
                                   init_method=init_method, group=self.group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_world_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight)  # [*, d]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_model_parallel_region(out, self.group)


def _weight_as(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in the activation dtype (fp16 input under fp32 masters); no dispatch when it already is."""
    return weight if weight.dtype == dtype else weight.to(dtype)


class ColumnParallelLinear(nn.Module):
    """``y = x A^T`` with A ``[out, in]`` split along its output rows: this rank holds ``[out/p, in]``.

    forward: ``[*, in]`` (replicated) -> ``[*, out/p]`` (or ``[*, out]`` with ``gather_output``).
    ``stride`` > 1 interleaves a fused weight (see :func:`initialize_parallel_weight`).
    """

    def __init__(self, in_features: int, out_features: int, *, init_method: InitMethod, stride: int = 1,
                 gather_output: bool = False, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.group = resolve_group(group)
        world_size = group_world_size(self.group)
        self.in_features, self.out_features, self.stride = in_features, out_features, stride
        self.gather_output = gather_output
        out_per_partition = divide(out_features, world_size, what="output size")
        self.weight = nn.Parameter(torch.empty(out_per_partition, in_features))
        initialize_parallel_weight(self.weight, (out_features, in_features), partition_dim=0,
                                   init_method=init_method, stride=stride, group=self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_model_parallel_region(x, self.group)
        y = linear(x, _weight_as(self.weight, x.dtype))  # [*, out/p]
        return gather_from_model_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x A^T`` with A ``[out, in]`` split along its input columns: this rank holds ``[out, in/p]``.

    forward: ``[*, in/p]`` (already parallel, or ``[*, in]`` scattered first when ``input_is_parallel=False``)
    -> ``[*, out]`` all-reduced over the group.
    """

    def __init__(self, in_features: int, out_features: int, *, init_method: InitMethod,
                 input_is_parallel: bool = True, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.group = resolve_group(group)
        world_size = group_world_size(self.group)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        in_per_partition = divide(in_features, world_size, what="input size")
        self.weight = nn.Parameter(torch.empty(out_features, in_per_partition))
        initialize_parallel_weight(self.weight, (out_features, in_features), partition_dim=1,
                                   init_method=init_method, group=self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_model_parallel_region(x, self.group)
        y = linear(x, _weight_as(self.weight, x.dtype))  # [*, out], partial sum over this rank's inputs
        return reduce_from_model_parallel_region(y, self.group)
