"""``[B, L, parts*H*dk]`` -> ``parts`` views ``[B, H, L, dk]``, with a backward that writes one gradient buffer.

Why: as ``view -> permute -> unbind``, autograd's backward first stacks the part gradients into a new
``[parts, B, H, L, dk]`` tensor (``UnbindBackward``) and then copies that again to undo the permute
(``ViewBackward``'s reshape of a non-contiguous tensor): two full passes over the Q/K/V gradient of every attention
layer (~18 ms of a 600 ms CPU training step of the benchmark model, benchmarks/RESULTS.md). Here each part's
gradient is copied once, straight into its slot of the ``[B, L, parts, H, dk]`` input gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from mpu import onednn_matmul


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, parts: int, heads: int, d_kv: int):
        b, length, _ = x.shape
        ctx.shape = (b, length, parts, heads, d_kv)
        ctx.set_materialize_grads(False)  # a part without gradient (e.g. unused) arrives as None, not zeros
        split = x.view(b, length, parts, heads, d_kv).permute(2, 0, 3, 1, 4)  # [parts, B, H, L, dk]
        return tuple(split[i] for i in range(parts))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        b, length, parts, heads, d_kv = ctx.shape
        dtype_like = next(g for g in grads if g is not None)
        grad = dtype_like.new_empty(b, length, parts, heads, d_kv)
        for i, g in enumerate(grads):
            slot = grad[:, :, i].transpose(1, 2)  # [B, H, L, dk] view of part i
            if g is None:
                slot.zero_()
            else:
                slot.copy_(g)
        return grad.view(b, length, parts * heads * d_kv), None, None, None


def split_heads(x: torch.Tensor, parts: int, heads: int, d_kv: int) -> tuple[torch.Tensor, ...]:
    """``x [B, L, parts*heads*d_kv]`` (rows grouped [part][head][dk]) -> ``parts`` tensors ``[B, heads, L, dk]``.

    The results are views of ``x``. Under autograd the custom backward above is used; otherwise plain views.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _SplitHeads.apply(x, parts, heads, d_kv)
    b, length, _ = x.shape
    return tuple(x.view(b, length, parts, heads, d_kv).permute(2, 0, 3, 1, 4).unbind(0))


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                     dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q k^T + bias) v`` (T5: unscaled scores), for training on CPU.

    Why not ``scaled_dot_product_attention`` there: a float mask that requires grad (the position bias) sends SDPA
    to its math path, which on top of the same two batched GEMMs multiplies q and k by sqrt(scale) even for scale 1,
    copies k^T, and runs a "safe" softmax that scans every row for all -inf (``all``/``where``/``isneginf``); and
    where SDPA could use its CPU flash kernel (cross-attention: the mask needs no gradient), that kernel's forward
    and backward are slower than these GEMMs at training shapes (gentask cross-attention, B 8, 8 heads, 32 x 128:
    2.3 ms vs 1.7 ms forward + backward; finetune, B 32, 4 x 64: 2.8 vs 1.6). Here the bias enters the first GEMM as
    ``baddbmm``'s input (no separate add pass) and the softmax is the plain one: the masks of this model are finite
    (very negative), so no row is all -inf. The two GEMMs and their gradients run through oneDNN
    (``mpu.onednn_matmul``; MKL's ``bmm``, at half that rate, where the extension is not built). It materialises
    the ``[B, H, Lq, Lk]`` scores, as SDPA's math path does; evaluation and generation keep SDPA (and its flash
    kernel) or the decode-step kernels.

    ``q [B, H, Lq, dk]``, ``k``/``v`` ``[B, H, Lk, dk]``, ``bias`` broadcastable to ``[B, H, Lq, Lk]`` or None
    -> ``[B, H, Lq, dk]``.
    """
    b, heads, q_len, d_kv = q.shape
    k_len = k.size(2)
    q3, k3t = q.reshape(b * heads, q_len, d_kv), k.reshape(b * heads, k_len, d_kv).transpose(1, 2)
    v3 = v.reshape(b * heads, k_len, d_kv)
    # torch.compile (--compile) traces ATen's bmm instead: it cannot functionalise the in-place addmatmul_
    fast = not torch.compiler.is_compiling() and onednn_matmul.usable(q3, k3t, v3, *(() if bias is None else (bias,)))
    if fast:
        scores = _OneDNNScores.apply(q3, k3t, bias, (b, heads, q_len, k_len))
    elif bias is None:
        scores = torch.bmm(q3, k3t)
    else:
        scores = torch.baddbmm(bias.expand(b, heads, q_len, k_len).reshape(b * heads, q_len, k_len), q3, k3t)
    # bf16/fp16 scores: normalise in fp32 (as SDPA's CPU flash kernel accumulates), then back to the input dtype
    probs = torch.softmax(scores, dim=-1) if scores.dtype == torch.float32 else \
        torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    context = _OneDNNBmm.apply(probs, v3) if fast else torch.bmm(probs, v3)
    return context.view(b, heads, q_len, d_kv)


# The two batched GEMMs of biased_attention through oneDNN (mpu/onednn_matmul.py: MKL's bmm runs at half of
# oneDNN's rate on this project's CPUs). Every operand and gradient below is contiguous or a transposed view of a
# contiguous tensor, the layouts oneDNN reads in place.

class _OneDNNBmm(torch.autograd.Function):
    """``a [N, M, K] @ b [N, K, P]``."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return onednn_matmul.matmul(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = onednn_matmul.matmul(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_b = onednn_matmul.matmul(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class _OneDNNScores(torch.autograd.Function):
    """``bias + q3 @ k3t`` -> ``[B*H, Lq, Lk]``, ``bias`` (or None) broadcastable to ``shape = (B, H, Lq, Lk)``:
    the bias is expanded into the output buffer and the GEMM accumulates onto it (no separate add pass)."""

    @staticmethod
    def forward(ctx, q3, k3t, bias, shape):
        b, heads, q_len, k_len = shape
        ctx.save_for_backward(q3, k3t)
        ctx.shape, ctx.bias_shape = shape, None if bias is None else bias.shape
        if bias is None:
            return onednn_matmul.matmul(q3, k3t)
        scores = torch.empty(b * heads, q_len, k_len, dtype=q3.dtype)
        scores.view(b, heads, q_len, k_len).copy_(bias.expand(shape))
        return onednn_matmul.addmatmul_(scores, q3, k3t)

    @staticmethod
    def backward(ctx, grad):
        q3, k3t = ctx.saved_tensors
        grad = grad.contiguous()
        grad_q = onednn_matmul.matmul(grad, k3t.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        # d(k3) = grad^T q3, computed contiguous [N, Lk, dk] and handed back as the transposed view k3t is
        grad_kt = onednn_matmul.matmul(grad.transpose(1, 2), q3).transpose(1, 2) if ctx.needs_input_grad[1] else None
        grad_bias = grad.view(ctx.shape).sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[2] else None
        return grad_q, grad_kt, grad_bias, None
