"""Where numbers go: the log, a JSON-lines metrics file and TensorBoard, all written by rank 0 only."""
from __future__ import annotations

import json
import logging
import os
import time

logger = logging.getLogger("cpm2")


class MetricsSink:
    """Appends `{"step", "split", ...}` records to SAVE/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, save_dir: str, *, enabled: bool):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(save_dir, exist_ok=True)
        self._jsonl = open(os.path.join(save_dir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is in requirements.txt; say so rather than silently skip
            raise RuntimeError("TensorBoard logging needs the `tensorboard` package: pip install -r requirements.txt") from e
        self._tb = SummaryWriter(log_dir=os.path.join(save_dir, "tensorboard"))

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{split}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class ThroughputMeter:
    """Tokens and samples per second between log lines; elapsed time and ETA of the run."""

    def __init__(self, total_steps: int, start_step: int):
        self.t0 = time.time()
        self.t_last = self.t0
        self.total_steps = total_steps
        self.start_step = start_step
        self.tokens = 0
        self.samples = 0

    def add(self, tokens: int, samples: int) -> None:
        self.tokens += tokens
        self.samples += samples

    def report(self, step: int) -> dict:
        now = time.time()
        dt = max(now - self.t_last, 1e-9)
        done = max(step - self.start_step, 1)
        elapsed = now - self.t0
        eta = elapsed / done * max(self.total_steps - step, 0)
        out = {"tokens_per_s": self.tokens / dt, "samples_per_s": self.samples / dt,
               "elapsed": format_duration(elapsed), "eta": format_duration(eta)}
        self.t_last = now
        self.tokens = 0
        self.samples = 0
        return out
