"""Fused CPU fp32 kernels for a training step's memory-bound ops (``mpu/csrc/fused_ops.cpp``): T5's gated GeLU,
RMSNorm and the cross-entropy of the logits, each as one autograd function whose forward and backward read their
inputs once.

Why: ATen runs each as several full passes over ``[tokens, hidden]`` (or ``[tokens, vocab]``) tensors; on a
2-core CPU those passes are ~10 % of the benchmark model's training step (benchmarks/RESULTS.md, fifth session).
The callers (model/transformer.py, mpu/cross_entropy.py) use these where :func:`usable` says so (fp32 CPU
tensors, the library built; mpu/cpp_extension.py), with or without gradients (an activation-checkpointed forward
and its recomputation must agree exactly), and their ATen formulas elsewhere; the two agree up to fp32 rounding
(tests/mpu/test_fused_ops.py).
"""
from __future__ import annotations

import pathlib

import torch

from .cpp_extension import CppLibrary

LIBRARY = CppLibrary(
    "cpm2_fused_ops", pathlib.Path(__file__).resolve().parent / "csrc" / "fused_ops.cpp",
    fallback="Gated GeLU, RMSNorm and the loss run as ATen ops (several passes each)",
    cflags=("-O3", "-fopenmp"), ldflags=("-fopenmp",))

def set_enabled(enabled: bool) -> bool:
    """Let callers use the fused kernels or not (tests compare both); returns the previous setting."""
    return LIBRARY.set_enabled(enabled)


def usable(*tensors: torch.Tensor) -> bool:
    """The fused kernels apply: fp32 CPU tensors, not being traced by torch.compile, the library built."""
    return not torch.compiler.is_compiling() and LIBRARY.usable(*tensors)


class _GatedGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, lin):
        ctx.save_for_backward(gate, lin)
        return torch.ops.cpm2.gated_gelu(gate, lin)

    @staticmethod
    def backward(ctx, grad):
        gate, lin = ctx.saved_tensors
        grad_gate, grad_lin = torch.ops.cpm2.gated_gelu_backward(grad, gate, lin)
        return grad_gate, grad_lin


def _records(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gated_gelu(gate: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * lin`` (same shapes); saves only ``gate`` and ``lin`` for the backward."""
    if not _records(gate, lin):  # inference: the kernel alone, no autograd node
        return torch.ops.cpm2.gated_gelu(gate, lin)
    return _GatedGelu.apply(gate, lin)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.cpm2.rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = torch.ops.cpm2.rms_norm_bwd(grad, x, weight, rstd)
        return grad_x, (grad_w if ctx.needs_input_grad[1] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2, -1) + eps)``; ``x [*, d]``, ``weight [d]``."""
    if not _records(x, weight):
        return torch.ops.cpm2.rms_norm_fwd(x, weight, float(eps))[0]
    return _RMSNorm.apply(x, weight, float(eps))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels):
        loss, lse = torch.ops.cpm2.cross_entropy_fwd(logits, labels)
        ctx.save_for_backward(logits, labels, lse)
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        return torch.ops.cpm2.cross_entropy_bwd(grad_loss, logits, labels, lse), None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy ``logits [*, V]`` (fp32), ``labels [*]`` -> ``[*]``, with
    mpu.vocab_parallel_cross_entropy's convention for labels outside ``[0, V)`` (no logit picked)."""
    return _CrossEntropy.apply(logits, labels)
