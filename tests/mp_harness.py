"""Run a check function on N gloo ranks on localhost (torch.multiprocessing spawn, free port, 1 thread each).

The check must be a module-level function ``check(rank, world_size, *args)`` of an importable test module; it
raises on failure, and the exception (with its traceback) surfaces in the parent through ``mp.spawn``.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, check: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        check(rank, world_size, *args)
    finally:
        import mpu
        mpu.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(world_size: int, check: Callable[..., Any], *args: Any) -> None:
    """Spawn ``world_size`` processes running ``check``; raises if any rank fails."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "DS_ACCELERATOR")}
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        mp.spawn(_entry, args=(world_size, free_port(), check, args), nprocs=world_size, join=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
