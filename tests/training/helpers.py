"""Run `finetune_cpm2.py` in subprocesses on a tiny model and a tiny learnable LCQMC set (no ../shared needed)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "model" / "tiny_config.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_task_dir(root: Path, *, train: int = 64, dev: int = 16, test: int = 16) -> tuple[Path, Path]:
    """(data dir, vocab dir) for the demo LCQMC task, built with the project's own tools."""
    sys.path.insert(0, str(ROOT))
    from tools.make_demo_data import write_dataset

    data = root / "data"
    write_dataset(str(data), train=train, dev=dev, test=test, seed=0)
    vocab = root / "vocab"
    vocab.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_vocab.py"), "--corpus", str(data / "corpus.txt"),
                    "--out", str(vocab / "vocab.txt")], check=True, capture_output=True)
    return data, vocab


def base_args(data: Path, vocab: Path, save: Path, *extra: str) -> list[str]:
    return ["--model-config", str(TINY_CONFIG), "--tokenizer-path", str(vocab), "--data-path", str(data),
            "--data-name", "lcqmc", "--save", str(save), "--num-workers", "0", *extra]


def env_for(nproc: int = 1, **extra: str) -> dict:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1" if nproc > 1 else env.get("OMP_NUM_THREADS", "2"),
                "PYTHONPATH": str(ROOT), "CPM2_DIST_TIMEOUT_MINUTES": "3"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CPM2_FAULT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_finetune(args: list[str], *, nproc: int = 1, env: dict | None = None, check: bool = True,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """One process (plain python) or `nproc` processes (torch.distributed.run on a free port)."""
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "finetune_cpm2.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "finetune_cpm2.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or env_for(nproc), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetune_cpm2.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def train_losses(save: Path) -> list[tuple[int, float]]:
    out = []
    with open(save / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == "train":
                out.append((rec["step"], rec["loss"]))
    return out


def model_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full weights of the step the tracker names (MP shards merged)."""
    sys.path.insert(0, str(ROOT))
    from model.checkpoint import find_shards, iteration_dir, merge_shards, read_model_states, read_tracker

    shards = find_shards(iteration_dir(ckpt_dir, read_tracker(ckpt_dir)))
    modules = [read_model_states(p)["module"] for p in shards]
    return merge_shards(modules) if len(modules) > 1 else dict(modules[0])
