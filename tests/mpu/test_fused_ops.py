"""mpu/fused_ops.py: the fused gated GeLU, RMSNorm and cross-entropy kernels equal their ATen formulas (values and
gradients), the model and the loss use them in training, and without the library the ATen path runs."""
from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from model import transformer
from mpu import cross_entropy as ce_module
from mpu import fused_ops

needs_library = pytest.mark.skipif(os.environ.get("CPM2_CPU_EXTENSION", "1") == "0",
                                   reason="CPM2_CPU_EXTENSION=0 turns the C++ libraries off")


@needs_library
def test_library_builds_here():
    assert fused_ops.LIBRARY.available(), fused_ops.LIBRARY.failure()


def _grads(fn, inputs, upstream):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad((out * upstream).sum(), [t for t in inputs if t.requires_grad])
    return out, grads


@needs_library
@pytest.mark.parametrize("shape", [(2, 5, 48), (3, 33), (1, 1, 7)], ids=["3d", "2d-odd", "tail-only"])
def test_gated_gelu_equals_aten(shape):
    torch.manual_seed(0)
    gate, lin = torch.randn(shape) * 3, torch.randn(shape)
    gate.view(-1)[0] = 12.0  # tanh saturates
    gate.view(-1)[-1] = -12.0
    upstream = torch.randn(shape)
    ours = _grads(fused_ops.gated_gelu, (gate, lin), upstream)
    reference = _grads(lambda g, lo: F.gelu(g, approximate="tanh") * lo, (gate, lin), upstream)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1], reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_library
@pytest.mark.parametrize("shape", [(2, 5, 48), (40, 17), (3, 1, 64)],
                         ids=["3d", "40-rows-odd-hidden", "one-token-rows"])
def test_rms_norm_equals_aten(shape):
    torch.manual_seed(0)
    x, weight = torch.randn(shape) * 2, torch.randn(shape[-1])
    upstream = torch.randn(shape)
    ours = _grads(lambda a, w: fused_ops.rms_norm(a, w, 1e-6), (x, weight), upstream)
    reference = _grads(lambda a, w: w * (a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)), (x, weight),
                       upstream)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1], reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_library
def test_cross_entropy_equals_the_vocab_parallel_function():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 301) * 4
    labels = torch.randint(0, 301, (3, 5))
    labels[0, 0], labels[2, 4] = -100, 301  # outside the vocabulary: no logit picked
    upstream = torch.randn(3, 5)
    ours = _grads(fused_ops.cross_entropy, (logits, labels), upstream)
    reference = _grads(lambda z, y: ce_module._VocabParallelCrossEntropy.apply(z, y, None), (logits, labels),
                       upstream)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1][0], reference[1][0], rtol=1e-5, atol=1e-6)
    inside = F.cross_entropy(logits.view(-1, 301)[1:14], labels.view(-1)[1:14], reduction="none")
    torch.testing.assert_close(ours[0].view(-1)[1:14], inside, rtol=1e-5, atol=1e-5)  # and torch's own


@needs_library
def test_the_model_and_the_loss_use_the_fused_kernels_in_fp32(monkeypatch):
    calls = []
    for name in ("gated_gelu", "rms_norm", "cross_entropy"):
        real = getattr(fused_ops, name)
        monkeypatch.setattr(fused_ops, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    transformer.rms_norm(x, w, 1e-6)
    transformer.gated_gelu(x, x * 2)
    ce_module.vocab_parallel_cross_entropy(x, torch.zeros(2, 3, dtype=torch.long))
    assert calls == ["rms_norm", "gated_gelu", "cross_entropy"]
    calls.clear()
    with torch.no_grad():  # the same kernels without gradients (a checkpointed forward must match its recompute)
        transformer.rms_norm(x, w, 1e-6)
        transformer.gated_gelu(x, x)
    assert calls == ["rms_norm", "gated_gelu"]
    calls.clear()
    transformer.rms_norm(x.double(), w.double(), 1e-6)  # other dtypes: ATen
    transformer.gated_gelu(x.bfloat16(), x.bfloat16())
    assert calls == []


def test_without_the_library_the_aten_path_runs_after_one_warning(failing_build, caplog):
    failing_build(fused_ops.LIBRARY, "ninja: not found")
    x = torch.randn(2, 3, 8, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="cpm2"):
        y = transformer.rms_norm(transformer.gated_gelu(x, x), torch.ones(8), 1e-6)
        loss = ce_module.vocab_parallel_cross_entropy(y, torch.zeros(2, 3, dtype=torch.long)).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    warnings = [r.getMessage() for r in caplog.records if "cpm2_fused_ops" in r.getMessage()]
    assert len(warnings) == 1 and "ninja: not found" in warnings[0]
