"""Keep the best k checkpoints by the task's main metric (higher is better), in SAVE/best/.

SAVE/best/latest_checkpointed_iteration.txt names the best step, so `--load SAVE/best` takes the best weights
back. In prompt-only mode the files hold just `encoder.prompt_embeds.weight` (a few KB to MB); load them with
`--load BASE --load-prompt SAVE/best`. For prompt runs SAVE/best/ also holds `prompt_config.json` and
`base_checkpoint.json` (`{"load": BASE, "seed": S}`), written at start-up (training/prompt_tuning.py).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

import mpu
from model.checkpoint import atomic_write_text, save_model_checkpoint, write_tracker

logger = logging.getLogger("cpm2")

PROMPT_KEY = "encoder.prompt_embeds.weight"


def _dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def weights_to_save(model: torch.nn.Module, *, prompt_only: bool) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if prompt_only:
        return {PROMPT_KEY: state[PROMPT_KEY]}
    return state


class BestCheckpoints:
    def __init__(self, save_dir: str, k: int, metric: str):
        self.dir = Path(save_dir) / "best"
        self.k = max(int(k), 1)
        self.metric = metric
        self.entries: list[dict] = []  # [{"step", "value"}], best first

    def qualifies(self, value: float) -> bool:
        return len(self.entries) < self.k or value > self.entries[-1]["value"]

    @property
    def best_step(self) -> int | None:
        return self.entries[0]["step"] if self.entries else None

    def offer(self, model: torch.nn.Module, step: int, value: float, *, prompt_only: bool, extra: dict | None = None) -> bool:
        """Collective. Saves the weights if `value` is among the best k; returns whether it was saved."""
        if value != value or not self.qualifies(value):  # NaN never qualifies
            return False
        if mpu.get_data_parallel_rank() == 0:
            save_model_checkpoint(weights_to_save(model, prompt_only=prompt_only), self.dir, step,
                                  mp_rank=mpu.get_model_parallel_rank(), mp_size=mpu.get_model_parallel_world_size(),
                                  client_state={"metric": {self.metric: float(value)}, **(extra or {})})
        _barrier()
        self.entries.append({"step": step, "value": float(value)})
        self.entries.sort(key=lambda e: (-e["value"], e["step"]))
        dropped, self.entries = self.entries[self.k:], self.entries[:self.k]
        if _dist_rank() == 0:
            write_tracker(self.dir, self.entries[0]["step"])
            atomic_write_text(self.dir / "best.json", json.dumps({"metric": self.metric, "entries": self.entries}, indent=1))
            for e in dropped:
                shutil.rmtree(self.dir / str(e["step"]), ignore_errors=True)
        _barrier()
        logger.info("saved best-%d checkpoint at step %d (%s = %.4f) in %s", self.k, step, self.metric, value, self.dir)
        return True

    def state_dict(self) -> dict:
        return {"entries": list(self.entries)}

    def load_state_dict(self, state: dict) -> None:
        self.entries = list(state.get("entries", []))
