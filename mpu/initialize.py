"""Model- and data-parallel process groups.

Layout (Megatron's): with world size W and model-parallel size p, the MP groups are consecutive ranks
``[0..p-1], [p..2p-1], ...`` and the DP groups stride by p: ``[0, p, 2p, ...], [1, p+1, ...]``.

Without :func:`initialize_model_parallel` everything behaves as MP 1 / DP 1 and no ``torch.distributed`` call is
made, so a plain Python process (or a test that builds an unsharded reference) works unchanged.
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch.distributed as dist

_MODEL_PARALLEL_GROUP: Optional[dist.ProcessGroup] = None
_DATA_PARALLEL_GROUP: Optional[dist.ProcessGroup] = None
_MODEL_PARALLEL_RANKS: Optional[list[int]] = None
_DATA_PARALLEL_RANKS: Optional[list[int]] = None


def initialize_model_parallel(model_parallel_size: int, *, timeout: Optional[datetime.timedelta] = None) -> None:
    """Create the MP and DP groups; every rank must call this (``new_group`` is collective).

    ``timeout`` bounds every collective on these groups. Pass the world group's: ``new_group`` does not inherit
    it but falls back to torch's 30-minute default, so a hung peer would stall an MP/DP all-reduce that long.
    """
    global _MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP, _MODEL_PARALLEL_RANKS, _DATA_PARALLEL_RANKS
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed initialised first "
                           "(or skip it entirely to run as model-parallel size 1)")
    if _MODEL_PARALLEL_GROUP is not None:
        raise RuntimeError("model parallel groups are already initialised; call destroy_model_parallel() first")
    world_size = dist.get_world_size()
    if model_parallel_size < 1 or world_size % model_parallel_size != 0:
        raise ValueError(f"model-parallel size {model_parallel_size} must be >= 1 and divide the world size "
                         f"{world_size}")
    rank = dist.get_rank()
    data_parallel_size = world_size // model_parallel_size
    # new_group must be entered by every rank for every group, in the same order.
    for i in range(model_parallel_size):
        ranks = list(range(i, world_size, model_parallel_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS = group, ranks
    for i in range(data_parallel_size):
        ranks = list(range(i * model_parallel_size, (i + 1) * model_parallel_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _MODEL_PARALLEL_GROUP, _MODEL_PARALLEL_RANKS = group, ranks


def model_parallel_is_initialized() -> bool:
    return _MODEL_PARALLEL_GROUP is not None and _DATA_PARALLEL_GROUP is not None


def destroy_model_parallel() -> None:
    """Forget the groups (the process group itself is left to its owner)."""
    global _MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP, _MODEL_PARALLEL_RANKS, _DATA_PARALLEL_RANKS
    _MODEL_PARALLEL_GROUP = _DATA_PARALLEL_GROUP = None
    _MODEL_PARALLEL_RANKS = _DATA_PARALLEL_RANKS = None


def get_model_parallel_group() -> Optional[dist.ProcessGroup]:
    """The MP group of this rank, or None when not initialised (then MP size is 1)."""
    return _MODEL_PARALLEL_GROUP


def get_data_parallel_group() -> Optional[dist.ProcessGroup]:
    """The DP group of this rank, or None when not initialised (then DP size is 1)."""
    return _DATA_PARALLEL_GROUP


def get_model_parallel_world_size() -> int:
    return len(_MODEL_PARALLEL_RANKS) if _MODEL_PARALLEL_RANKS is not None else 1


def get_model_parallel_rank() -> int:
    return _MODEL_PARALLEL_RANKS.index(dist.get_rank()) if _MODEL_PARALLEL_RANKS is not None else 0


def get_model_parallel_src_rank() -> int:
    """Global rank of MP rank 0 in this rank's MP group (the source for broadcasts within the group)."""
    return _MODEL_PARALLEL_RANKS[0] if _MODEL_PARALLEL_RANKS is not None else 0


def get_model_parallel_ranks() -> list[int]:
    """Global ranks of this rank's MP group (``[0]`` when not initialised)."""
    return list(_MODEL_PARALLEL_RANKS) if _MODEL_PARALLEL_RANKS is not None else [0]


def get_data_parallel_world_size() -> int:
    return len(_DATA_PARALLEL_RANKS) if _DATA_PARALLEL_RANKS is not None else 1


def get_data_parallel_rank() -> int:
    return _DATA_PARALLEL_RANKS.index(dist.get_rank()) if _DATA_PARALLEL_RANKS is not None else 0


def get_data_parallel_ranks() -> list[int]:
    """Global ranks of this rank's DP group (``[0]`` when not initialised)."""
    return list(_DATA_PARALLEL_RANKS) if _DATA_PARALLEL_RANKS is not None else [0]


def group_world_size(group: Optional[dist.ProcessGroup]) -> int:
    """Size of ``group``; None (no group: the uninitialised MP 1 case) has size 1."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This process's rank inside ``group``; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def resolve_group(group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """An explicit group wins; None means this rank's model-parallel group (None again when uninitialised)."""
    return group if group is not None else _MODEL_PARALLEL_GROUP
