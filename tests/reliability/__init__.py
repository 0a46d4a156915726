"""Reliability tests (docs/reliability.md): kills and --resume, disk faults, bad data, bad checkpoints,
numerics, rank failure.

`project_module` exists because pytest imports `tests/training/` (a package inside a `tests/` that has no
`__init__.py`) as the top-level module `training`, which shadows the project's `training` package inside the
test process. These tests call the project's `training` code in-process, so they import it with the shadow moved
aside for the duration of the import and put back afterwards (the project's modules are kept here, one copy,
and stay referenced by whatever imported them). Both kinds of tests can then be collected in one session in
any order. Once `tests/__init__.py` exists there is no shadow and this is a plain import.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_TOP = "training"
_project: dict[str, object] = {}  # the project's training.* modules, imported once


def _ours(key: str) -> bool:
    return key == _TOP or key.startswith(_TOP + ".")


def project_module(name: str):
    """Import the project's module `name` (e.g. "training.loop", or "finetune_cpm2", which imports training)."""
    if (ROOT / "tests" / "__init__.py").exists():
        return importlib.import_module(name)
    shadow = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _ours(k)]}
    if not _project:
        # The project's `training` is a namespace package (no __init__.py), which loses to any regular package
        # of that name on sys.path: build it by hand, rooted at the project's folder.
        package = types.ModuleType(_TOP)
        package.__path__ = [str(ROOT / _TOP)]
        _project[_TOP] = package
    sys.modules.update(_project)
    try:
        return importlib.import_module(name)
    finally:
        for key in [k for k in sys.modules if _ours(k)]:
            _project[key] = sys.modules.pop(key)
        sys.modules.update(shadow)
