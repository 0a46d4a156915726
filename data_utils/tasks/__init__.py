"""The task registry: one `Task` per original ``--data-name`` (SPEC §6), looked up by name, never branched on.

    >>> from data_utils.tasks import get_task
    >>> get_task("lcqmc").kind
    'classify'
"""
from __future__ import annotations

from data_utils.tasks.base import KINDS, DecodingDefaults, Task

__all__ = ["Task", "DecodingDefaults", "register", "get_task", "task_names"]

_TASKS: dict[str, Task] = {}
_ALIASES: dict[str, str] = {}  # readable alias -> registry name


def register(task: Task) -> Task:
    """Add ``task`` under ``task.name`` and its aliases; a name or alias that is already taken raises."""
    if not task.name:
        raise ValueError(f"{type(task).__name__} has no name")
    if task.kind not in KINDS:
        raise ValueError(f"task {task.name!r} has kind {task.kind!r}; use one of {', '.join(KINDS)}")
    for key in (task.name, *task.aliases):
        if key in _TASKS or key in _ALIASES:
            owner = _ALIASES.get(key, key)
            raise ValueError(f"task name {key!r} is already registered (by task {owner!r})")
    _TASKS[task.name] = task
    for alias in task.aliases:
        _ALIASES[alias] = task.name
    return task


def get_task(name: str) -> Task:
    """The task registered as ``name`` (an original ``--data-name`` or an alias such as ``math23k``)."""
    key = _ALIASES.get(name, name)
    if key not in _TASKS:
        aliases = ", ".join(f"{a} (= {n})" for a, n in sorted(_ALIASES.items()))
        raise ValueError(f"unknown task {name!r} for --data-name; valid names: {', '.join(task_names())}"
                         + (f"; aliases: {aliases}" if aliases else ""))
    return _TASKS[key]


def task_names() -> list[str]:
    """The registry names (original ``--data-name`` spellings), sorted."""
    return sorted(_TASKS)


def _register_builtin() -> None:
    # Imported here, not at module top, so that each task file can import `data_utils.tasks.base` freely.
    from data_utils.tasks.adgen import AdGen
    from data_utils.tasks.c3 import C3
    from data_utils.tasks.ccpm import CCPM
    from data_utils.tasks.lcqmc import LCQMC
    from data_utils.tasks.lcsts import LCSTS
    from data_utils.tasks.math import Math23K
    from data_utils.tasks.sogou_log import SogouLog
    from data_utils.tasks.wmtencn import WMTENCN

    for task_class in (LCQMC, CCPM, C3, Math23K, LCSTS, AdGen, WMTENCN, SogouLog):
        register(task_class())


_register_builtin()
