"""Cross-entropy over vocab-parallel logits (Megatron's ``cross_entropy.py``).

Each rank holds logits ``[B, L, V/p]`` for its contiguous id range. The loss per token is
``log(sum_v exp(z_v - m)) - (z_label - m)`` with ``m`` the global max (stability). Three all-reduces: the max
(MAX), the label's logit (SUM, only its owner contributes) and the sum of exps (SUM). The gradient is written by
hand: ``softmax(z) - onehot(label)`` on this rank's slice, times the incoming gradient.

Labels outside ``[0, V)`` (e.g. -100) match no rank: their loss is the log-partition and their gradient the
softmax. Mask them out with a loss mask (as the training loss does) rather than relying on an ignore index.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import fused_ops
from .initialize import group_rank, group_world_size, resolve_group
from .utils import vocab_range


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """All communication of the loss lives here; the arithmetic is in the static helpers below."""

    @staticmethod
    def _label_mask(labels: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outside [B, L] bool, local label ids [B, L] clamped to 0 where outside)``."""
        outside = (labels < start) | (labels >= end)
        return outside, (labels - start).masked_fill(outside, 0)

    @staticmethod
    def _picked_logit(logits: torch.Tensor, local: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
        """``logits[b, l, local[b, l]]`` or 0 where the label lives on another rank: ``[B, L]``."""
        picked = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(outside, 0.0)

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group: Optional[dist.ProcessGroup]):
        logits = logits.float()  # fp32 throughout, as the original
        world_size = group_world_size(group)
        start, end = vocab_range(logits.size(-1) * world_size, group_rank(group), world_size)

        logits_max = logits.max(dim=-1)[0]  # [B, L]
        if world_size > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)  # [B, L, V/p], <= 0

        outside, local = _VocabParallelCrossEntropy._label_mask(labels, start, end)
        picked = _VocabParallelCrossEntropy._picked_logit(shifted, local, outside)  # [B, L]
        exp = shifted.exp()  # [B, L, V/p]
        sum_exp = exp.sum(dim=-1)  # [B, L]
        if world_size > 1:
            dist.all_reduce(picked, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - picked  # [B, L]

        softmax = exp.div_(sum_exp.unsqueeze(-1))  # reuse the buffer: [B, L, V/p]
        ctx.save_for_backward(softmax, outside, local)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, outside, local = ctx.saved_tensors
        grad = softmax.clone()
        # subtract the one-hot of the label on the rank that owns it
        own = (~outside).to(grad.dtype).unsqueeze(-1)  # [B, L, 1]
        grad.scatter_add_(-1, local.unsqueeze(-1), -own)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token cross-entropy of vocab-parallel logits.

    Args:
        logits: ``[B, L, V/p]`` (any float dtype; computed in fp32), this rank's vocab slice.
        labels: ``[B, L]`` long, global ids in ``[0, V)``.
        group: the model-parallel group (None: this rank's MP group, size 1 when uninitialised).
    Returns:
        ``[B, L]`` fp32 loss, identical on every rank of the group.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                         "expected logits [B, L, V/p] and labels [B, L]")
    group = resolve_group(group)
    if group_world_size(group) == 1 and fused_ops.usable(logits):
        return fused_ops.cross_entropy(logits, labels)  # one kernel per pass over the logits (mpu/fused_ops.py)
    return _VocabParallelCrossEntropy.apply(logits, labels, group)
