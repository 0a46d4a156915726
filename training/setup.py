"""Process set-up: logging, distributed init, model-parallel groups, seeds, device.

Only this module and `arguments.py` read the environment. Everything below receives plain values.
"""
from __future__ import annotations

import datetime
import gc
import importlib
import logging
import os
import random
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger("cpm2")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    mp_size: int
    mp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        # Warnings and errors from any rank matter (a dying rank must be heard); info only from rank 0.
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int, log_file: str | None = None) -> None:
    fmt = logging.Formatter(f"[%(asctime)s] [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(fmt)
    handler.addFilter(_RankFilter(rank))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if log_file and rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    # DeepSpeed and jieba log at INFO on every rank; keep the console readable.
    for noisy in ("DeepSpeed", "deepspeed", "jieba", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def has_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_single_process_env() -> None:
    """A plain `python finetune_cpm2.py` run is a world of one: give DeepSpeed the env it expects.

    Without RANK/WORLD_SIZE/... DeepSpeed tries MPI discovery and fails on mpi4py (cpu-environment.md §2).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _skip_cpu_shm_comm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first init (50-80 s).

    gloo is correct without it; set CPM2_BUILD_SHM_COMM=1 to let DeepSpeed build and use it.
    This relies on DeepSpeed 0.19's `deepspeed.comm.torch.build_shm_op` (cpu-environment.md §2).
    """
    if os.environ.get("CPM2_BUILD_SHM_COMM") == "1":
        return
    import deepspeed.comm.torch  # noqa: F401  (loads the submodule)
    ds_comm_torch = sys.modules["deepspeed.comm.torch"]
    if hasattr(ds_comm_torch, "build_shm_op"):
        ds_comm_torch.build_shm_op = lambda: None


def init_distributed(mp_size: int, timeout_minutes: float | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU) and the MP/DP groups."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    import mpu

    gpu = has_gpu()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_cpu_shm_comm_build()
    _fill_single_process_env()
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % mp_size != 0:
        raise ValueError(f"--model-parallel-size {mp_size} does not divide the world size {world_size}; "
                         f"launch a multiple of {mp_size} processes")
    backend = "nccl" if gpu else "gloo"
    if gpu:
        get_accelerator().set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if timeout_minutes is None:
        # Bounds every collective and the rendezvous: a rank that hangs (or dies where no launcher notices)
        # makes the others fail after this long instead of waiting for ever (docs/reliability.md).
        raw = os.environ.get("CPM2_DIST_TIMEOUT_MINUTES", "30")
        try:
            timeout_minutes = float(raw)
        except ValueError:
            timeout_minutes = -1.0
        if not timeout_minutes > 0:
            raise ValueError(f"CPM2_DIST_TIMEOUT_MINUTES={raw!r} must be a positive number of minutes (default 30)")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when first imported. DeepSpeed
    # imports it while building an engine, i.e. after the world group exists, and ten functions then hold that
    # group until the interpreter ends: teardown cannot destroy it, its gloo worker threads outlive Python, and
    # one of them finishing a collective during interpreter shutdown aborted the process ("terminate called
    # without an active exception", SIGABRT, exit 134 after a finished run). Imported here first, the defaults
    # are None (resolved to the current world group at call time).
    importlib.import_module("torch.distributed.nn.functional")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    mpu.initialize_model_parallel(mp_size, timeout=timeout)  # new groups do not inherit the world's timeout
    return DistInfo(
        rank=rank, world_size=world_size, local_rank=local_rank,
        mp_size=mp_size, mp_rank=mpu.get_model_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(), dp_rank=mpu.get_data_parallel_rank(),
        device=device, backend=backend,
    )


def set_seed(seed: int) -> None:
    """Same seed on every rank: MP ranks must draw identical replicated values (sampling, shuffles)."""
    import mpu

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    mpu.model_parallel_seed(seed)


def teardown() -> None:
    import torch.distributed as dist

    import mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    # The engine, optimizer and hooks of a finished run form reference cycles that still hold process groups.
    # Collect them now, while the interpreter is whole: each group's destructor (which releases the GIL) joins its
    # worker threads. Left to the collection inside interpreter shutdown, a worker still releasing the tensors of
    # the last collective needs the GIL there and aborts the process.
    gc.collect()
    leftover = process_group_threads()
    if leftover:
        logger.warning(
            "teardown: %d process-group threads still running (%s): something still holds a process group, and "
            "the interpreter's exit may abort (SIGABRT) after a finished run", len(leftover), ", ".join(leftover))


def process_group_threads() -> list[str]:
    """Names of this process's gloo/NCCL worker threads (Linux; elsewhere always empty)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(n for n in names if n.startswith(("pt_gloo", "gloo_", "pt_nccl")))
