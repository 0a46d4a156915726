"""DeepSpeed config and engine construction, in one documented order.

Order (each step needs the previous one):
1. the model is built and its weights loaded (before any optimizer exists: the original's ZeRO-1 built fp32
   masters from random weights and overwrote the loaded checkpoint on the first step, original-toolkit.md §7);
2. frozen parameters get `requires_grad=False` (prompt tuning with `fix_model`), so neither gradients nor
   optimizer state nor fp32 masters are ever allocated for them;
3. the client AdamW over the trainable param groups, and the LR schedule;
4. `deepspeed.initialize`, which owns gradient accumulation, clipping, loss scaling (fp16) and the optimizer step.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass

import torch

from training.grad_clip import FusedClipping
from training.lr_schedule import WarmupDecayLR

logger = logging.getLogger(__name__)
_FUSED_CLIPPING = True

DEFAULT_DS_CONFIG: dict = {
    "zero_optimization": {"stage": 0},
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 1.0,
    "steps_per_print": 10 ** 9,
    "wall_clock_breakdown": False,
}


@dataclass(frozen=True)
class OptimSettings:
    lr: float
    weight_decay: float
    clip_grad: float
    micro_batch_size: int
    grad_acc_steps: int
    dp_size: int
    fp16: bool
    bf16: bool
    warmup_steps: int
    decay_steps: int
    decay_style: str
    loss_scale: float | None = None
    loss_scale_window: int | None = None
    hysteresis: int | None = None
    min_scale: float | None = None


def _set(cfg: dict, path: tuple[str, ...], value, source: str) -> None:
    """Set cfg[path] = value, logging when it replaces a different value from the JSON."""
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {})
    old = node.get(path[-1], None)
    if old is not None and old != value:
        logger.info("DeepSpeed config: %s = %r replaced by %r (%s)", ".".join(path), old, value, source)
    node[path[-1]] = value


def build_ds_config(json_path: str | None, s: OptimSettings) -> dict:
    """The DS JSON (or defaults) with the batch, precision and clipping keys set from the CLI, every change logged."""
    if json_path:
        with open(json_path, encoding="utf-8") as f:
            cfg = json.load(f)
    else:
        cfg = copy.deepcopy(DEFAULT_DS_CONFIG)
    # The original overwrote these silently; they come from the CLI so scripts have one source of truth.
    _set(cfg, ("train_micro_batch_size_per_gpu",), s.micro_batch_size, "--batch-size")
    _set(cfg, ("gradient_accumulation_steps",), s.grad_acc_steps, "--gradient-accumulation-steps")
    _set(cfg, ("train_batch_size",), s.micro_batch_size * s.grad_acc_steps * s.dp_size,
         "batch-size x grad-acc x data-parallel size")
    _set(cfg, ("gradient_clipping",), s.clip_grad, "--clip-grad")
    _set(cfg, ("fp16", "enabled"), s.fp16, "--fp16" if s.fp16 else "no --fp16 flag")
    _set(cfg, ("bf16", "enabled"), s.bf16, "--bf16" if s.bf16 else "no --bf16 flag")
    if s.fp16:
        for key, value, flag in (("loss_scale", s.loss_scale, "--loss-scale"),
                                 ("loss_scale_window", s.loss_scale_window, "--loss-scale-window"),
                                 ("hysteresis", s.hysteresis, "--hysteresis"),
                                 ("min_loss_scale", s.min_scale, "--min-scale")):
            if value is not None:
                _set(cfg, ("fp16", key), value, flag)
    stage = _zero_stage(cfg)
    if stage not in (0, 1, 2):
        raise ValueError(f"the DeepSpeed config {json_path} asks for ZeRO stage {stage}; the toolkit runs stages 0, 1 "
                         "and 2 (stage 3 partitions the parameters themselves, and its checkpoints, evaluation and "
                         "generation read each rank's parameters whole)")
    # Client optimizers under ZeRO need this DeepSpeed switch; AdamW is what the original's FusedAdam computed.
    cfg["zero_allow_untested_optimizer"] = True
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(f"the DeepSpeed config {json_path} defines '{key}'; remove it: the toolkit passes its "
                             "own AdamW and LR schedule (set them with --lr, --lr-decay-style, --warmup)")
    # DeepSpeed's own progress and per-step timer prints would interleave with ours (we log tokens/s ourselves).
    cfg["steps_per_print"] = 10 ** 9
    _set(cfg, ("wall_clock_breakdown",), False, "the toolkit logs throughput itself")
    return cfg


def _zero_stage(cfg: dict):
    zero = cfg.get("zero_optimization", {})
    if isinstance(zero, dict):
        return zero.get("stage", 0)
    return int(zero) if isinstance(zero, bool) else zero  # old DeepSpeed configs wrote a bool: true = stage 1


def build_optimizer(model: torch.nn.Module, s: OptimSettings, *, prompt_only: bool) -> torch.optim.Optimizer:
    groups = [g for g in model.param_groups(s.weight_decay, prompt_only=prompt_only) if g["params"]]
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise RuntimeError("no trainable parameters: check --prompt-tune / fix_model / fix_prompt settings")
    # betas/eps as the original's apex FusedAdam (AdamW mode). fused=True: one in-place kernel per tensor instead
    # of ~10 elementwise passes, each allocating a temporary the size of the tensor (on CPU the plain loop was
    # 130 ms of a 770 ms step of the benchmark model, the fused kernel 17 ms; benchmarks/RESULTS.md).
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=s.weight_decay,
                             fused=fused)


def build_engine(model: torch.nn.Module, s: OptimSettings, ds_config: dict, *, prompt_only: bool):
    """Returns (engine, optimizer, lr_scheduler). The model must already hold its loaded weights."""
    import deepspeed

    import mpu

    optimizer = build_optimizer(model, s, prompt_only=prompt_only)
    scheduler = WarmupDecayLR(optimizer, base_lr=s.lr, warmup_steps=s.warmup_steps, decay_steps=s.decay_steps,
                              style=s.decay_style)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu, config=ds_config,
        dist_init_required=False)
    if s.dp_size == 1 and not engine.zero_optimization():
        # With one data-parallel rank there is nothing to average, but DeepSpeed still flattens every gradient
        # into one buffer, all-reduces it over a group of one and copies it back: ~0.2 s per step and a
        # model-sized temporary (benchmarks/RESULTS.md, profile). ZeRO stages do their reduction in the
        # optimizer and keep DeepSpeed's path.
        engine.enable_backward_allreduce = False
    if _FUSED_CLIPPING:
        FusedClipping.install(engine, optimizer, s.clip_grad)
    return engine, ds_optimizer, ds_scheduler
