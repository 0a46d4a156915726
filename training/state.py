"""Resume checkpoints: everything a run needs to continue exactly, written so that a kill never leaves a
checkpoint the loader would accept but that is incomplete.

Layout under SAVE/checkpoints/:
    latest_checkpointed_iteration.txt      the tracker: written last, atomically, names a complete step dir
    <step>/mp_rank_XX_model_states.pt       DeepSpeed's model states (our parameter names under `module`, so
                                            `--load SAVE/checkpoints` takes them back), plus lr scheduler
    <step>/*optim_states.pt                 DeepSpeed's optimizer / ZeRO partitions
    <step>/rng_state_rank_XXXXX.pt          per-rank Python / numpy / torch / device / model-parallel RNG
    <step>/trainer_state.json               step, epoch, sampler position, best metrics, counters
    prompt_config.json, base_checkpoint.json   prompt runs only (written at start-up by finetune_cpm2.build_model,
                                            see training/prompt_tuning.py): with fix_model the step dirs hold the
                                            prompt and its optimizer state only (`exclude_frozen_parameters`), so
                                            `--resume` must bring the same `--load BASE`; it is checked against
                                            base_checkpoint.json before anything loads

A step dir is first written as `.tmp-<step>/<step>` by every rank, then renamed into place by rank 0 after a
barrier, then the tracker is rewritten. A kill at any point leaves the previous tracker pointing at the previous
complete step. Optimizer state files are read back by DeepSpeed's own loader (a pickle): trust them only when
they come from your own runs. Model weights from anywhere else always go through `model.checkpoint` with
`weights_only=True`.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

import mpu
from training import faults
from model.checkpoint import (TRACKER_NAME, atomic_torch_save, atomic_write_text, load_shard, read_tracker,
                              write_tracker)

logger = logging.getLogger("cpm2")

CKPT_SUBDIR = "checkpoints"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def capture_rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "device": get_accelerator().get_rng_state(),
        "tracker": mpu.get_rng_tracker().get_states(),
    }


def restore_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["device"])
    mpu.get_rng_tracker().set_states(state["tracker"])


def checkpoint_root(save_dir: str) -> Path:
    return Path(save_dir) / CKPT_SUBDIR


def latest_step(save_dir: str) -> int | None:
    root = checkpoint_root(save_dir)
    if not (root / TRACKER_NAME).exists():
        return None
    it = read_tracker(root)
    if not isinstance(it, int):
        raise RuntimeError(f"{root / TRACKER_NAME} holds {it!r}; a resume checkpoint needs a step number")
    return it


def save_resume_checkpoint(engine, save_dir: str, step: int, trainer_state: dict, *, frozen_excluded: bool) -> Path:
    """Collective: every rank must call it. Returns the final step dir."""
    root = checkpoint_root(save_dir)
    tmp_root = root / f".tmp-{step}"
    final = root / str(step)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_root, ignore_errors=True)
        tmp_root.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp_root), tag=str(step), client_state={"iteration": step}, save_latest=False,
                           exclude_frozen_parameters=frozen_excluded)
    atomic_torch_save(capture_rng_state(), tmp_root / str(step) / f"rng_state_rank_{_rank():05d}.pt")
    faults.maybe_kill("save")
    _barrier()
    if _rank() == 0:
        atomic_write_text(tmp_root / str(step) / "trainer_state.json", json.dumps(trainer_state, indent=1))
        if final.exists():  # the same step saved again (e.g. resumed and stopped at once): replace it whole
            shutil.rmtree(final)
        os.replace(tmp_root / str(step), final)
        write_tracker(root, step)
        shutil.rmtree(tmp_root, ignore_errors=True)
        _prune(root, keep=step)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    """Resume needs only the newest complete step; older ones and leftovers of killed saves go."""
    for child in root.iterdir():
        if child.name == TRACKER_NAME or child.name == str(keep):
            continue
        if child.is_dir() and (child.name.isdigit() or child.name.startswith(".tmp-")):
            shutil.rmtree(child, ignore_errors=True)


def load_resume_checkpoint(engine, save_dir: str, *, frozen_excluded: bool) -> dict | None:
    """Restore engine (weights, optimizer, scheduler), RNG and trainer state from SAVE/checkpoints; None if none."""
    step = latest_step(save_dir)
    if step is None:
        return None
    root = checkpoint_root(save_dir)
    step_dir = root / str(step)
    path, _ = engine.load_checkpoint(str(root), tag=str(step), load_optimizer_states=True,
                                     load_lr_scheduler_states=True, load_module_strict=not frozen_excluded)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {step_dir}; the tracker "
                           f"{root / TRACKER_NAME} names step {step}")
    with open(step_dir / "trainer_state.json", encoding="utf-8") as f:
        trainer_state = json.load(f)
    rng_file = step_dir / f"rng_state_rank_{_rank():05d}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(f"{rng_file} is missing: was the run saved with a different number of processes?")
    restore_rng_state(load_shard(rng_file))
    logger.info("resumed from %s (step %d)", step_dir, step)
    return trainer_state
