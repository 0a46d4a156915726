"""File-level checkpoint I/O: safe shard reading, atomic writes, the tracker file, the shard directory.

Layout (SPEC §4, the released CPM-2 weights and our own checkpoints alike)::

    DIR/latest_checkpointed_iteration.txt      "100000" (an iteration number) or "release"
    DIR/<iteration>/mp_rank_00_model_states.pt  one file per model-parallel rank, a dict with `module`
    DIR/<iteration>/mp_rank_01_model_states.pt  (the weights) and DeepSpeed 0.3.9 bookkeeping keys
    ...

Trust model: a `.pt` file is a pickle, and a pickle can run any code when loaded. Shards are therefore
read with `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers, plus an
allow-list of exactly the non-tensor types the released 2021 files hold (see `SHARD_SAFE_GLOBALS`).
Anything else is refused before it runs.

Crash safety: every file is written to a temp file in the same directory, fsynced, then `os.replace`d
over the target, so a reader sees the old file or the new one, never half of one. The tracker is written
last (after all ranks have saved), so it never points at an incomplete iteration. Temp files are named
`.<name>.<random>.tmp` and never match the shard pattern, so a leftover one is not taken for a shard.
"""
from __future__ import annotations

import contextlib
import copy
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "TRACKER_NAME", "SHARD_PATTERN", "SHARD_SAFE_GLOBALS", "shard_name", "load_shard", "read_model_states",
    "atomic_write", "atomic_torch_save", "atomic_write_text", "read_tracker", "write_tracker", "find_shards",
    "iteration_dir",
]

TRACKER_NAME = "latest_checkpointed_iteration.txt"
# DeepSpeed names shards with "{:02d}"; an MP size of 100 or more gives three digits.
SHARD_PATTERN = re.compile(r"mp_rank_(\d{2,})_model_states\.pt")

_LAYOUT_HINT = (f"expected DIR/{TRACKER_NAME} holding an iteration number or 'release', and "
                f"DIR/<iteration>/mp_rank_XX_model_states.pt (for the released Chinese CPM-2: "
                f"cpm2/{TRACKER_NAME} containing 100000, and cpm2/100000/mp_rank_00..03_model_states.pt)")


def shard_name(mp_rank: int) -> str:
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def _numpy_safe_globals() -> list[Any]:
    """numpy types needed to rebuild `np.random.get_state()` (a tuple holding a uint32 ndarray).

    The 2021 files were pickled by numpy 1.x, whose ndarray reducer is `numpy.core.multiarray._reconstruct`;
    numpy 2 renamed the module to `numpy._core`. The (object, "pickle name") form allow-lists a name
    without importing it, so both spellings map to the function of the installed numpy.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    reconstruct = core.multiarray._reconstruct
    items: list[Any] = [
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
    ]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 names a class per dtype
    if dtypes is not None and hasattr(dtypes, "UInt32DType"):
        items.append((dtypes.UInt32DType, "numpy.dtypes.UInt32DType"))
    return items


# `set`: DeepSpeed's `csr_tensor_module_names`. Python's random state is a tuple of ints and needs nothing.
SHARD_SAFE_GLOBALS: list[Any] = [set, *_numpy_safe_globals()]


def load_shard(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """`torch.load` a checkpoint file on CPU without running code from it.

    Raises FileNotFoundError when absent, RuntimeError naming the file when it holds a global outside the
    allow-list (a pickle that could run code) or is truncated / corrupt. With `mmap=True` (zip-format
    files only; older files are read normally) tensors are paged in lazily, so reading one slice of a big
    shard does not read all of it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} not found")
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(SHARD_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL [\w.]+", str(e))
        if found is None:  # not a forbidden global: a damaged or foreign pickle stream
            detail = [ln for ln in str(e).splitlines() if ln.strip() and "WeightsUnpickler" not in ln]
            raise RuntimeError(f"{path}: cannot read checkpoint file, it is truncated or corrupt "
                               f"(unpickling failed: {detail[1] if len(detail) > 1 else e}); "
                               f"re-download or re-save it") from None
        raise RuntimeError(
            f"{path}: refused to load: it holds a Python object outside the checkpoint allow-list "
            f"({found.group(0)}). Unpickling it could run arbitrary code, so it was not executed. Only tensors, "
            f"containers, numbers, strings, sets and numpy RNG state are accepted; if you trust this file, "
            f"re-save its tensors from a sandbox.") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, IndexError, KeyError) as e:
        raise RuntimeError(f"{path}: cannot read checkpoint file, it is truncated or corrupt "
                           f"({type(e).__name__}: {e}); re-download or re-save it") from None


def read_model_states(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """`load_shard` plus a check that the file is a model-states dict with a `module` state dict.

    With `mmap`, only the `module` tensors stay memory-mapped; the other entries (RNG states, ...) are
    copied, so keeping them does not keep the whole file mapped (and its read pages resident).
    """
    states = load_shard(path, mmap=mmap)
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        keys = sorted(states) if isinstance(states, dict) else type(states).__name__
        raise ValueError(f"{path}: not a model-states file: expected a dict with a 'module' state dict, "
                         f"found {keys}")
    if mmap:
        module = states.pop("module")
        states = copy.deepcopy(states)
        states["module"] = module
    return states


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems do not support fsync on a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Call `write(file)` on a temp file beside `path`, fsync it, then atomically rename it to `path`.

    On any error (or a crash) `path` keeps its previous content; the temp file is removed on error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; checkpoints are meant to be shared read-only
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)`, atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_tracker(load_dir: str | os.PathLike) -> int | str:
    """The iteration named by `DIR/latest_checkpointed_iteration.txt`: an int, or the string "release"."""
    path = Path(load_dir) / TRACKER_NAME
    if not path.is_file():
        where = "it does not exist" if not Path(load_dir).is_dir() else "there is no such file in it"
        raise FileNotFoundError(f"no checkpoint tracker {path} ({where}); {_LAYOUT_HINT}. "
                                f"Refusing to start from random weights.")
    text = path.read_text(encoding="utf-8").strip()
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number or 'release', found {text[:80]!r}") from None


def write_tracker(save_dir: str | os.PathLike, iteration: int | str) -> Path:
    """Point `DIR/latest_checkpointed_iteration.txt` at `iteration` (atomically).

    Call it only after every rank has finished `save_model_checkpoint` (a barrier), so the tracker
    never names an incomplete checkpoint.
    """
    if not (isinstance(iteration, int) or iteration == "release"):
        raise ValueError(f"iteration must be an int or 'release', got {iteration!r}")
    return atomic_write_text(Path(save_dir) / TRACKER_NAME, f"{iteration}\n")


def iteration_dir(load_dir: str | os.PathLike, iteration: int | str) -> Path:
    path = Path(load_dir) / str(iteration)
    if not path.is_dir():
        raise FileNotFoundError(f"{Path(load_dir) / TRACKER_NAME} names iteration {iteration!r} but the "
                                f"directory {path} does not exist; {_LAYOUT_HINT}")
    return path


def find_shards(directory: str | os.PathLike) -> list[Path]:
    """The shard files of one iteration directory, in rank order; raises if none or if ranks are missing."""
    directory = Path(directory)
    ranks: dict[int, Path] = {}
    for entry in directory.iterdir():
        m = SHARD_PATTERN.fullmatch(entry.name)
        if m and entry.is_file():
            ranks[int(m.group(1))] = entry
    if not ranks:
        present = sorted(e.name for e in directory.iterdir())[:10]
        raise FileNotFoundError(f"no mp_rank_XX_model_states.pt files in {directory} (found: {present}); "
                                f"{_LAYOUT_HINT}")
    size = max(ranks) + 1
    missing = [shard_name(r) for r in range(size) if r not in ranks]
    if missing:
        raise FileNotFoundError(f"found {len(ranks)} of {size} shard files in {directory}: missing {missing}; "
                                f"the checkpoint is incomplete (an interrupted copy or save?)")
    return [ranks[r] for r in range(size)]
