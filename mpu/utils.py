"""Small helpers for tensor model parallelism: divisibility checks with actionable errors, splits, vocab ranges."""
from __future__ import annotations

import math
from typing import Sequence

import torch


def divide(numerator: int, denominator: int, *, what: str = "value") -> int:
    """Return ``numerator // denominator``; raise ValueError naming ``what`` when it does not divide evenly."""
    if denominator <= 0:
        raise ValueError(f"cannot split {what} {numerator} into {denominator} parts; the part count must be >= 1")
    if numerator % denominator != 0:
        raise ValueError(f"{what} {numerator} is not divisible by {denominator}")
    return numerator // denominator


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _format_choices(choices: Sequence[object], last: str = "or") -> str:
    """``[1, 2, 4] -> "1, 2 or 4"``."""
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" {last} " + names[-1]


def check_model_parallel_size(model_parallel_size: int, sizes: dict[str, int], *, max_choices: int = 12) -> None:
    """Refuse an MP size that does not divide every sharded dimension.

    ``sizes`` maps a dimension's name to its value, e.g. ``{"num_heads": 64, "d_ff": 10240, "vocab_size": 51968}``.
    The error names the failing values, the rule and the valid MP sizes (the divisors of the gcd of all sizes), e.g.
    "model-parallel size 6 does not divide num_heads 64 and vocab_size 51968 (the MP size must divide num_heads,
    d_ff and vocab_size); use 1, 2, 4, 8, 16, 32 or 64".
    """
    if model_parallel_size < 1:
        raise ValueError(f"model-parallel size must be >= 1, got {model_parallel_size}")
    common = 0
    for value in sizes.values():
        common = math.gcd(common, int(value))
    valid = _divisors(common)[:max_choices] if common > 0 else [1]
    failing = [f"{name} {value}" for name, value in sizes.items() if value % model_parallel_size != 0]
    if failing:
        raise ValueError(
            f"model-parallel size {model_parallel_size} does not divide {_format_choices(failing, 'and')} "
            f"(the MP size must divide {_format_choices(list(sizes), 'and')}); use {_format_choices(valid)}"
        )


def split_tensor_along_last_dim(tensor: torch.Tensor, num_partitions: int) -> list[torch.Tensor]:
    """Split ``[..., D]`` into ``num_partitions`` views ``[..., D/num_partitions]`` (not contiguous)."""
    last = divide(tensor.size(-1), num_partitions, what="last dimension")
    return list(torch.split(tensor, last, dim=-1))


def vocab_range(global_vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Ids ``[first, last)`` owned by ``rank`` when the vocab is split contiguously into ``world_size`` parts."""
    per_partition = divide(global_vocab_size, world_size, what="vocab_size")
    first = rank * per_partition
    return first, first + per_partition
