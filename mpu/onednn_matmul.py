"""oneDNN matmul on strided fp32 CPU operands (``mpu/csrc/onednn_matmul.cpp``), built the first time it is needed.

Why: on this project's CPUs (AMD EPYC, AVX-512) PyTorch's fp32 ``mm`` / ``bmm`` run through MKL's AVX2 path at
about 200 GFLOP/s, and the oneDNN entry reachable from Python (``mkldnn::_linear_pointwise``, mpu/fast_linear.py)
copies a transposed input before its GEMM. Training has two such GEMMs per linear layer and attention layer:

- the weight gradient ``dW = dY^T X`` (``dY^T`` is a transposed view): 301 -> 432 GFLOP/s at [1024 x 1024] x
  [1024 x 512];
- attention's batched ``q k^T`` and ``probs v`` and their gradients: MKL ``bmm`` 203 -> 440 GFLOP/s at
  [64, 128, 64] x [64, 64, 128].

``at::native::mkldnn_matmul`` reads contiguous or transposed operands in place at oneDNN's rate, but has no
operator; the C++ file wraps it as ``torch.ops.cpm2.onednn_matmul`` and ``onednn_addmatmul_``.

Built on first use (mpu/cpp_extension.py); where it cannot be built, one warning says why and callers keep their
previous path (MKL ``bmm``, a copy before oneDNN's linear): results are the same up to summation order.
"""
from __future__ import annotations

import pathlib
from typing import Optional

import torch

from .cpp_extension import CppLibrary


def _register_fakes() -> None:
    @torch.library.register_fake("cpm2::onednn_matmul")
    def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty(*a.shape[:-1], b.size(-1))


LIBRARY = CppLibrary(
    "cpm2_onednn_matmul", pathlib.Path(__file__).resolve().parent / "csrc" / "onednn_matmul.cpp",
    fallback="Training's weight-gradient and attention GEMMs on CPU use the slower path (MKL bmm, a copy before "
             "the GEMM)", register_fakes=_register_fakes)


def available() -> bool:
    """Build (first call) or load the extension; False, with one warning saying why, where that failed."""
    return LIBRARY.available()


def failure() -> Optional[str]:
    """Why the extension is not in use (None when it is, or before the first :func:`available` call)."""
    return LIBRARY.failure()


def set_enabled(enabled: bool) -> bool:
    """Let callers use the extension or not (tests compare both paths); returns the previous setting."""
    return LIBRARY.set_enabled(enabled)


def usable(*tensors: torch.Tensor) -> bool:
    """The extension applies to these operands: fp32 CPU tensors, it is enabled and built."""
    return LIBRARY.usable(*tensors)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D or batched 3-D fp32 CPU tensors; contiguous or transposed operands are read in place
    (other layouts are copied first). The caller checks :func:`usable`."""
    return torch.ops.cpm2.onednn_matmul(a, b)


def addmatmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out += a @ b`` in place (``out`` contiguous fp32 of the product's shape); returns ``out``."""
    return torch.ops.cpm2.onednn_addmatmul_(out, a, b)
