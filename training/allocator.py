"""glibc malloc settings for CPU training, applied by re-executing the process before any work starts.

Why: a CPU training step frees and re-allocates the same large buffers every step (gradients, AdamW temporaries,
the dense embedding gradient, the transposed operands of the weight-gradient GEMMs). With glibc's defaults, blocks
over the dynamic mmap threshold (at most 32 MB) are fresh ``mmap`` regions and freed heap tops are trimmed, so every
step pays a page fault per 4 KB page of them: a ``torch.zeros(26240, 512)`` took 15.7 ms instead of 0.75 ms, and the
benchmark model's training step spent ~100 ms of ~700 ms in page faults (benchmarks/RESULTS.md). Keeping freed
memory in the heap (no mmap for large blocks, no trimming) removes that; peak RSS is unchanged (measured), but
memory freed late in a run is not handed back to the OS until the process ends.

glibc reads ``GLIBC_TUNABLES`` once at process start, so the setting needs a re-exec (same PID, same argv).
Only on CPU hosts: on GPU hosts host-side allocations are few, and a large host copy freed after the move to the
GPU should go back to the OS. Opt out with ``CPM2_MALLOC_TUNING=0``; keys the user already set in
``GLIBC_TUNABLES`` are kept as they are.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Mapping, Optional, Sequence

TUNABLES: dict[str, str] = {
    "glibc.malloc.mmap_max": "0",  # large blocks come from the heap, so they can be reused
    "glibc.malloc.trim_threshold": str(1 << 40),  # never trim the heap top between steps
}
OPT_OUT_VAR = "CPM2_MALLOC_TUNING"
_REEXEC_MARK = "_CPM2_MALLOC_REEXEC"


def merged_tunables(existing: Optional[str]) -> str:
    """``GLIBC_TUNABLES`` with ours added; a key already present in ``existing`` keeps the user's value."""
    items = [item for item in (existing or "").split(":") if item]
    present = {item.split("=", 1)[0] for item in items}
    items += [f"{key}={value}" for key, value in TUNABLES.items() if key not in present]
    return ":".join(items)


def is_tuned(env: Mapping[str, str]) -> bool:
    present = {item.split("=", 1)[0] for item in env.get("GLIBC_TUNABLES", "").split(":") if item}
    return set(TUNABLES) <= present


def has_nvidia_gpu() -> bool:
    """Cheap check before torch is imported: the NVIDIA driver is loaded or its tool is installed."""
    return os.path.exists("/proc/driver/nvidia") or shutil.which("nvidia-smi") is not None


def reexec_with_tuned_malloc(argv: Optional[Sequence[str]] = None, *, force: bool = False) -> None:
    """Re-execute this Python process (``argv``: script and arguments; default: exactly as started) with the
    tunables set, unless they already are, the user opted out, this is
    not Linux, or (without ``force``) a GPU is present. Returns only when nothing was done."""
    if sys.platform != "linux" or os.environ.get(OPT_OUT_VAR, "1") == "0" or is_tuned(os.environ) \
            or os.environ.get(_REEXEC_MARK):
        return
    if not force and has_nvidia_gpu():
        return
    env = dict(os.environ, GLIBC_TUNABLES=merged_tunables(os.environ.get("GLIBC_TUNABLES")))
    env[_REEXEC_MARK] = "1"  # never loop, even if something strips the variable again
    # orig_argv keeps the interpreter's own flags (-u from the deepspeed launcher, -m module) as they were.
    args = list(sys.orig_argv) if argv is None else [sys.executable, *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args[1:]], env)
