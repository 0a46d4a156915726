"""Fault injection for the reliability tests (docs/reliability.md). Unset (the default) every hook costs one dict
lookup and does nothing.

`CPM2_FAULT=<point>:<n>` acts the n-th time this process reaches <point>:
    step  after the n-th optimizer step's backward, before the update is applied
    eval  inside the n-th evaluation, after its first batch
    save  inside the n-th checkpoint write, after the model files and before the tracker
The action is SIGKILL, or with `CPM2_FAULT_ACTION=hang` blocking forever (a stuck rank: the others must time
out, not wait for ever).

`CPM2_FAULT=nan:<s>[:<k>]` multiplies the training loss by NaN on optimizer steps s .. s+k-1 (1-based, as
logged; k defaults to 1), before the backward, so gradients are non-finite too, as in a real overflow.

Only the rank named by `CPM2_FAULT_RANK` (default 0) is affected. This module reads the environment itself
(an exception to STYLE's rule) so that production code carries no test flags.
"""
from __future__ import annotations

import os
import signal
import time

import torch

_counts: dict[str, int] = {}


def _target() -> tuple[str, list[int]] | None:
    spec = os.environ.get("CPM2_FAULT")
    if not spec:
        return None
    point, *numbers = spec.split(":")
    return point, [int(n) for n in numbers if n] or [1]


def _is_fault_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == int(os.environ.get("CPM2_FAULT_RANK", "0"))


def maybe_kill(point: str) -> None:
    target = _target()
    if target is None or target[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == target[1][0] and _is_fault_rank():
        if os.environ.get("CPM2_FAULT_ACTION") == "hang":
            while True:
                time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_poison_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """`loss * NaN` when `step` (1-based optimizer step) is one of the `nan:<s>[:<k>]` steps, else `loss`."""
    target = _target()
    if target is None or target[0] != "nan" or not _is_fault_rank():
        return loss
    first, count = target[1][0], (target[1][1] if len(target[1]) > 1 else 1)
    return loss * float("nan") if first <= step < first + count else loss
