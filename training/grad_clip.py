"""Gradient-norm clipping for the fp32 ZeRO-0 engine: the same norm as DeepSpeed, one pass fewer over the gradients.

DeepSpeed clips fp32 ZeRO-0 gradients in ``engine.clip_fp32_gradients`` with a Python loop: one ``norm`` call per
parameter, then ``grad.mul_(coef)`` for every parameter even when ``coef`` is 1. On the CPU benchmark model that was
20 ms of a 600 ms step (benchmarks/RESULTS.md). Here the norms come from one ``torch._foreach_norm`` call, and the
scale is not applied to the gradients at all: it is handed to the fused AdamW kernel as its ``grad_scale`` (the
divisor that ``torch.amp.GradScaler`` uses to unscale gradients inside the same kernel), so the optimizer reads
each gradient once instead of clipping rewriting it first. When the optimizer is not a fused torch optimizer,
the gradients are scaled in place with ``torch._foreach_mul_``, and only when ``coef < 1``.

The norm is DeepSpeed's (``deepspeed.runtime.utils.clip_grad_norm_``): squares of split (``model_parallel``)
gradients summed on every model-parallel rank, of replicated ones on MP rank 0 only, all-reduced over the MP
group; ``coef = min(1, max_norm / (norm + 1e-6))``. After the data-parallel all-reduce every DP rank holds the
same gradients, so the norm needs no DP reduction (DeepSpeed averages the identical values).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import mpu


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of the gradients of ``params`` over the whole model-parallel group (fp32 0-dim tensor)."""
    mp_rank0 = mpu.get_model_parallel_rank() == 0
    grads = [p.grad for p in params if p.grad is not None and (mp_rank0 or getattr(p, "model_parallel", False))]
    device = params[0].device if params else torch.device("cpu")
    if grads:
        total_sq = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
    else:
        total_sq = torch.zeros((), dtype=torch.float32, device=device)
    if mpu.get_model_parallel_world_size() > 1:
        dist.all_reduce(total_sq, group=mpu.get_model_parallel_group())
    return total_sq.sqrt()


def _supports_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """A torch optimizer whose fused kernel applies ``self.grad_scale`` (divides every gradient by it)."""
    fused = all(group.get("fused") for group in optimizer.param_groups)
    return fused and getattr(optimizer, "_step_supports_amp_scaling", False)


class FusedClipping:
    """Replaces ``engine.clip_fp32_gradients`` (see the module docstring); :meth:`install` says whether it did."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        self.optimizer, self.max_norm = optimizer, float(max_norm)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.in_kernel = _supports_grad_scale(optimizer)

    @classmethod
    def install(cls, engine, optimizer: torch.optim.Optimizer, max_norm: float) -> "FusedClipping | None":
        """Only where DeepSpeed would call ``clip_fp32_gradients``: fp32, no ZeRO, clipping on, and the engine
        steps this very optimizer (fp16/bf16/ZeRO optimizers clip inside their own wrappers)."""
        if max_norm <= 0 or engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization() \
                or engine.optimizer is not optimizer or not hasattr(engine, "clip_fp32_gradients"):
            return None
        clipping = cls(optimizer, max_norm)
        engine.clip_fp32_gradients = clipping
        if clipping.in_kernel:
            optimizer.register_step_post_hook(clipping._clear_scale)
        return clipping

    def __call__(self) -> torch.Tensor:
        norm = global_grad_norm(self.params)
        coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
        if self.in_kernel:
            self.optimizer.grad_scale = coef.reciprocal().reshape(1)  # the kernel divides each gradient by it
        elif coef.item() < 1.0:
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, coef)
        return norm

    def _clear_scale(self, optimizer, args, kwargs) -> None:
        optimizer.grad_scale = None
