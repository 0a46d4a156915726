"""The project's small C++ operator libraries (``*/csrc/*.cpp``), built on first use and loaded once per process.

Each library is one source file of ATen code registering ``torch.ops.cpm2.*`` operators (no pybind11, so a
build takes ~10 s). ``torch.utils.cpp_extension.load`` compiles it with g++ and ninja (pinned in
requirements.txt) into ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) the first time a process
asks; later processes only load it. Where a library cannot be built (no compiler, say), one warning gives the
reason and what is used instead, and :meth:`CppLibrary.available` stays False: every caller keeps a Python path
with the same results. ``CPM2_CPU_EXTENSION=0`` turns all of them off.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import threading
import time
from typing import Callable, Optional

import torch

logger = logging.getLogger("cpm2")


def _ensure_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pinned ``ninja`` wheel puts it next to the venv's python,
    which is not on PATH when the venv's python is run without activating it (scripts/test.sh, .ci/run)."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI wheel

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


STALE_LOCK_SECONDS = 600.0
INCLUDE_DIR = pathlib.Path(__file__).resolve().parent / "csrc"  # cpm2_vector_math.h, shared by the libraries


def _remove_stale_lock(lock: pathlib.Path) -> None:
    """torch's builder makes the first process build while the others wait for its lock file to go. A process
    killed mid-build (SIGKILL, OOM) leaves the file, and every later process would wait forever; a build takes
    ~10 s, so a lock older than STALE_LOCK_SECONDS is a leftover and is removed (with a warning)."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        logger.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
        lock.unlink(missing_ok=True)


class CppLibrary:
    """One operator library: ``source`` built as ``name`` with ``cflags``; ``fallback`` says (in the warning) what
    runs without it; ``register_fakes`` registers shapes for ``torch.compile`` once it is loaded."""

    def __init__(self, name: str, source: pathlib.Path, fallback: str,
                 register_fakes: Callable[[], None] = lambda: None, cflags: tuple[str, ...] = ("-O2",),
                 ldflags: tuple[str, ...] = ()) -> None:
        self.name, self.source, self.fallback, self.register_fakes = name, source, fallback, register_fakes
        self.cflags, self.ldflags = list(cflags), list(ldflags)
        self._loaded: Optional[bool] = None  # None: not tried yet
        self._failure: Optional[str] = None
        self._lock = threading.Lock()
        self.enabled = True

    def _build(self) -> None:
        from torch.utils import cpp_extension

        _ensure_ninja_on_path()
        build_dir = pathlib.Path(cpp_extension._get_build_directory(self.name, verbose=False))
        _remove_stale_lock(build_dir / "lock")
        if not (build_dir / f"{self.name}.so").exists():  # say why the first step pauses
            logger.info("building C++ library %s in %s (first use on this machine, ~10-20 s)", self.name, build_dir)
        cpp_extension.load(name=self.name, sources=[str(self.source)], extra_cflags=self.cflags,
                           extra_ldflags=self.ldflags, extra_include_paths=[str(INCLUDE_DIR)],
                           is_python_module=False, verbose=False)
        self.register_fakes()

    def available(self) -> bool:
        """Build (first call) or load the library; False, with one warning saying why, where that failed."""
        if self._loaded is not None:
            return self._loaded
        with self._lock:
            if self._loaded is not None:
                return self._loaded
            if os.environ.get("CPM2_CPU_EXTENSION", "1") == "0":
                self._failure, self._loaded = "turned off by CPM2_CPU_EXTENSION=0", False
            elif not torch.backends.mkldnn.is_available():
                self._failure, self._loaded = "this torch build has no oneDNN (mkldnn)", False
            else:
                try:
                    self._build()
                    self._loaded = True
                except Exception as exc:  # a missing compiler or ninja, a failed compile or load: say so, go on
                    self._failure, self._loaded = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}", False
                    logger.warning("C++ library %s (%s) not built: %s. %s; results are the same. It needs g++ and "
                                   "ninja (requirements.txt).", self.name, self.source, self._failure, self.fallback)
        return self._loaded

    def failure(self) -> Optional[str]:
        """Why the library is not in use (None when it is, or before the first :meth:`available` call)."""
        return self._failure

    def set_enabled(self, enabled: bool) -> bool:
        """Let callers use the library or not (tests compare both paths); returns the previous setting."""
        previous, self.enabled = self.enabled, bool(enabled)
        return previous

    def usable(self, *tensors: torch.Tensor) -> bool:
        """The library applies to these tensors: all fp32 on the CPU, it is enabled and built (the build is
        attempted only for such tensors)."""
        return self.enabled and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) \
            and self.available()
