"""Learning-rate schedules with warm-up (the original's AnnealingLR, without its lr-0 first step).

The original set `warmup_iter = warmup // grad_acc + 1` and evaluated the schedule at step 0 for the first update,
so the first optimizer step always ran with lr 0 (original-toolkit.md §7). Here step numbers start at 1: the first
update uses `lr_at(1)`, which is positive for every style.
"""
from __future__ import annotations

import math

import torch

STYLES = ("constant", "linear", "cosine", "exponential", "noam")


def lr_at(step: int, *, base_lr: float, warmup_steps: int, decay_steps: int, style: str, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (1-based)."""
    if style not in STYLES:
        raise ValueError(f"unknown lr decay style {style!r}; choose one of {', '.join(STYLES)}")
    if style == "noam":
        # Transformer schedule: linear warm-up, then inverse square root, peaking at base_lr after warm-up.
        w = max(warmup_steps, 1)
        return base_lr * min(step / w, math.sqrt(w / step))
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * step / warmup_steps
    if style == "constant":
        return base_lr
    span = max(decay_steps - warmup_steps, 1)
    # 0 on the first step after warm-up, (span-1)/span on the last planned step: no step runs at lr 0.
    progress = min(max(step - warmup_steps - 1, 0) / span, 1.0)
    if style == "linear":
        lr = base_lr * (1.0 - progress)
    elif style == "cosine":
        lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # exponential: halves over the decay span, as Megatron's AnnealingLR did
        lr = base_lr * 0.5 ** progress
    return max(lr, min_lr)


class WarmupDecayLR:
    """Sets `lr` of every param group; stepped by DeepSpeed after each applied optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, warmup_steps: int, decay_steps: int,
                 style: str, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)
        self.style = style
        self.min_lr = min_lr
        self.num_steps = 0  # optimizer steps applied so far
        lr_at(1, base_lr=base_lr, warmup_steps=self.warmup_steps, decay_steps=self.decay_steps, style=style)
        self._apply()

    def current_lr(self) -> float:
        return lr_at(self.num_steps + 1, base_lr=self.base_lr, warmup_steps=self.warmup_steps,
                     decay_steps=self.decay_steps, style=self.style, min_lr=self.min_lr)

    def _apply(self) -> None:
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, *args, **kwargs) -> None:
        self.num_steps += 1
        self._apply()

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "base_lr": self.base_lr, "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps, "style": self.style, "min_lr": self.min_lr}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()
