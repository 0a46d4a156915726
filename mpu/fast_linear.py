"""``y = x W^T`` (``F.linear`` without bias) through oneDNN on CPU fp32: the one matmul entry of the model.

Why: on this project's CPUs (AMD EPYC with AVX-512) the MKL sgemm behind ``F.linear`` runs at about 40 % of what
oneDNN's JIT kernels reach on the same shapes (measured 2.2-2.4x on the training GEMMs, M = 2048), and for the
small-M GEMMs of incremental decoding (M = 8..32 rows, weights streamed from memory every step) oneDNN with a
prepacked ("blocked") weight layout is 2-2.5x faster again. The results equal ``F.linear`` up to summation order
(about 1e-6 relative; tests/model/test_fast_inference.py checks 1e-5).

Three paths, chosen per call:

- ``torch.inference_mode()`` inside a :func:`packed_weights` block (one ``generate`` or evaluation call): the
  weight is reordered once into oneDNN's blocked layout and cached for the rest of the block (also keyed by the
  Parameter's ``_version`` and ``data_ptr``). The cache is emptied when the outermost block ends, because
  DeepSpeed's ZeRO optimizers write updated weights through ``.data`` views of a flat buffer, which changes neither
  ``_version`` nor ``data_ptr``: a cache that outlived the call served stale weights to the next evaluation.
  Inference mode outside a block uses oneDNN on the plain weight. While a block runs, the cache holds one extra
  copy of each weight.
- autograd (training): :class:`_OneDNNLinear`, whose forward and both backward GEMMs are oneDNN calls on the
  plain (unpacked) tensors; weights change every step, so nothing is cached.
- anything else (other dtypes, other devices, tracing, oneDNN unavailable, ``CPM2_ONEDNN_LINEAR=0``):
  ``F.linear``.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from . import onednn_matmul

_ENABLED = os.environ.get("CPM2_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available() \
    and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

# (form kind, id of each weight) -> (weakrefs to the weights, their (_version, data_ptr), the form): cached_form
_PACKED: dict[tuple, tuple] = {}


def set_enabled(enabled: bool) -> bool:
    """Turn the oneDNN path on or off (tests compare both); returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled) and torch.backends.mkldnn.is_available()
    if not _ENABLED:
        _PACKED.clear()
    return previous


_PACK_DEPTH = 0  # nesting depth of packed_weights() blocks


@contextlib.contextmanager
def packed_weights() -> Iterator[None]:
    """Let inference-mode calls in this block reuse packed weights; the block must not change any weight."""
    global _PACK_DEPTH
    _PACK_DEPTH += 1
    try:
        yield
    finally:
        _PACK_DEPTH -= 1
        if _PACK_DEPTH == 0:
            _PACKED.clear()


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_ENABLED and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and weight.dim() == 2 and x.dim() >= 2 and x.numel() > 0
            and not torch.jit.is_scripting() and not torch.compiler.is_compiling())


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """oneDNN ``x [*, in] @ weight^T -> [*, out]``; ``weight`` is dense ``[out, in]`` (any strides) or packed."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def cached_form(kind: str, weights: tuple[torch.Tensor, ...], build: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``build(*weights)`` (detached), made once per :func:`packed_weights` block and rebuilt when any of the weights
    changed since (version or storage); dropped when one of them is freed. ``kind`` names the form: oneDNN's
    packed layout here, model/decode_step.py's 16-column panels."""
    key = (kind, *(id(w) for w in weights))
    stamp = tuple((w._version, w.data_ptr()) for w in weights)
    entry = _PACKED.get(key)
    if entry is not None and entry[1] == stamp and all(ref() is w for ref, w in zip(entry[0], weights)):
        return entry[2]
    form = build(*(w.detach() for w in weights))
    refs = tuple(weakref.ref(w, lambda _, k=key: _PACKED.pop(k, None)) for w in weights)
    _PACKED[key] = (refs, stamp, form)
    return form


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN-blocked copy of ``weight`` (inference only), rebuilt when the weight changed since packing."""
    return cached_form("onednn", (weight,), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None))


def packed_pair(weight_a: torch.Tensor, weight_b: torch.Tensor) -> torch.Tensor:
    """The oneDNN-blocked copy of ``[weight_a; weight_b]`` (inference only), rebuilt when either weight changed."""
    return cached_form("onednn", (weight_a, weight_b),
                       lambda a, b: torch.ops.mkldnn._reorder_linear_weight(torch.cat([a, b]), None))


def _packable(*weights: torch.Tensor) -> bool:
    """Inference inside a :func:`packed_weights` block, with 2-D fp32 CPU weights oneDNN can pack."""
    return bool(_PACK_DEPTH) and _ENABLED and torch.is_inference_mode_enabled() and all(
        w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2 for w in weights)


def _onednn_input(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu"


def bind(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> linear(x, weight)`` for calls that all happen inside the current :func:`packed_weights` block at
    inference (one decode step after another): the packed weight is looked up once here, not at every call."""
    if _packable(weight):
        packed = packed_weight(weight)
        return lambda x: _onednn(x, packed) if _onednn_input(x) else linear(x, weight)
    return lambda x: linear(x, weight)


def bind_pair(weight_a: torch.Tensor, weight_b: torch.Tensor
              ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`bind` for :func:`linear_pair`."""
    if _packable(weight_a, weight_b) and weight_a.size(1) == weight_b.size(1):
        packed, split = packed_pair(weight_a, weight_b), weight_a.size(0)

        def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not _onednn_input(x):
                return linear(x, weight_a), linear(x, weight_b)
            y = _onednn(x, packed)
            return y[..., :split], y[..., split:]
        return run
    return lambda x: linear_pair(x, weight_a, weight_b)


def linear_pair(x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(x, weight_a), linear(x, weight_b))``; inside a :func:`packed_weights` block at inference, as one
    GEMM on the two weights concatenated and packed once (one pass over ``x`` and one oneDNN call instead of two;
    the outputs are views into one ``[*, out_a + out_b]`` tensor)."""
    if not (_packable(weight_a, weight_b) and _usable(x, weight_a) and weight_a.size(1) == weight_b.size(1)):
        return linear(x, weight_a), linear(x, weight_b)
    y = _onednn(x, packed_pair(weight_a, weight_b))
    return y[..., :weight_a.size(0)], y[..., weight_a.size(0):]


class _OneDNNLinear(torch.autograd.Function):
    """Autograd for ``x [N, in] @ W^T`` with the three GEMMs in oneDNN (saves what F.linear saves: x and W)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _onednn(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # autograd may hand over expanded (stride-0) gradients
        grad_x = grad_w = None
        if torch.is_grad_enabled():  # double backward (create_graph): stay differentiable
            if ctx.needs_input_grad[0]:
                grad_x = grad.mm(weight)
            if ctx.needs_input_grad[1]:
                grad_w = grad.t().mm(x)
            return grad_x, grad_w
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t())  # [N, out] @ W -> [N, in]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad, x)
        return grad_x, grad_w


def _weight_grad(grad: torch.Tensor, x: torch.Tensor,
                 gemm: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``grad [N, out]^T @ x [N, in] -> [out, in]``. oneDNN's linear (``gemm``, default :func:`_onednn`) would copy
    the transposed ``grad^T`` first (~30 % of this GEMM's time); the matmul extension reads it in place
    (mpu/onednn_matmul.py)."""
    if onednn_matmul.usable(grad, x):
        return onednn_matmul.matmul(grad.t(), x)
    return (gemm or _onednn)(grad.t(), x.t())


@torch.library.custom_op("cpm2::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [*, in] @ weight^T`` in oneDNN as an opaque op for ``torch.compile`` (``--compile``): traced through,
    the linear layers would fall back to ``F.linear`` (MKL), which made a compiled CPU step 1.6x slower than eager
    (991 ms vs 616 ms on the benchmark model); with this op the compiled step keeps the oneDNN GEMMs (583 ms)."""
    return _onednn(x, weight)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.size(0))


def _onednn_linear_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _onednn_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1]:
        grad_w = _weight_grad(grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1)), gemm=onednn_linear)
    return grad_x, grad_w


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias): ``x [*, in]``, ``weight [out, in]`` -> ``[*, out]``."""
    if torch.compiler.is_compiling():
        compilable = (_ENABLED and x.dtype == torch.float32 and weight.dtype == torch.float32
                      and x.device.type == "cpu" and weight.device.type == "cpu" and weight.dim() == 2)
        return onednn_linear(x, weight) if compilable else F.linear(x, weight)
    if not _usable(x, weight):
        return F.linear(x, weight)
    if torch.is_inference_mode_enabled():
        return _onednn(x, packed_weight(weight) if _PACK_DEPTH else weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        # The Function sees 2-D tensors and the [*, out] view is taken outside it: an output that is a view made
        # inside a custom Function could not be modified in place afterwards (autograd forbids it).
        y = _OneDNNLinear.apply(x.reshape(-1, x.size(-1)), weight)  # [N, out]
        return y.view(*x.shape[:-1], y.size(-1))
    return _onednn(x, weight)
