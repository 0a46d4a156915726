"""Fault injection for the reliability tests: `CPM2_FAULT=<point>:<n>` SIGKILLs this process the n-th time
the run reaches <point> (step, eval, save). Unset (the default) it does nothing but a dict lookup.

Points: `step` (after the n-th optimizer step's backward, before the update is applied), `eval` (inside the
n-th evaluation, after its first batch), `save` (inside the n-th checkpoint write, after the model files and
before the tracker).
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("CPM2_FAULT")
    if not spec:
        return None
    point, _, n = spec.partition(":")
    return point, int(n or 1)


def maybe_kill(point: str) -> None:
    target = _target()
    if target is None or target[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == target[1] and int(os.environ.get("RANK", "0")) == int(os.environ.get("CPM2_FAULT_RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
