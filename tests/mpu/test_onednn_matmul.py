"""mpu/onednn_matmul.py: the C++ extension builds here, equals torch.matmul on every operand layout, and its
callers (the linear layers' weight gradient, training attention) give the gradients of the plain path with it.
Without it (no compiler), one warning says why and the callers keep working."""
from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from model import attention_ops
from mpu import fast_linear, onednn_matmul

OFF = os.environ.get("CPM2_CPU_EXTENSION", "1") == "0"
needs_extension = pytest.mark.skipif(OFF, reason="CPM2_CPU_EXTENSION=0 turns the extension off")


@needs_extension
def test_extension_builds_here():
    # g++ and ninja are in this project's requirements (README): a build failure here is a defect, not a skip
    assert onednn_matmul.available(), onednn_matmul.failure()
    assert onednn_matmul.failure() is None


def _layouts(shape, layout):
    """A tensor of ``shape`` that is contiguous (N), a transposed view (T) or a sliced, strided view (S)."""
    if layout == "N":
        return torch.randn(shape)
    if layout == "T":
        return torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    return torch.randn(*shape[:-1], shape[-1] * 2)[..., ::2]


@needs_extension
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("layout", ["NN", "TN", "NT", "TT", "SN", "NS"])
def test_matmul_equals_torch_on_every_layout(batched, layout):
    torch.manual_seed(0)
    lead = (3,) if batched else ()
    a, b = _layouts(lead + (17, 40), layout[0]), _layouts(lead + (40, 23), layout[1])
    torch.testing.assert_close(onednn_matmul.matmul(a, b), torch.matmul(a, b), rtol=1e-5, atol=1e-5)
    out = torch.randn(lead + (17, 23))
    expected = out + torch.matmul(a, b)
    assert onednn_matmul.addmatmul_(out, a, b) is out
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_extension
def test_matmul_empty_and_refusals():
    assert torch.equal(onednn_matmul.matmul(torch.randn(4, 0), torch.randn(0, 3)), torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="float32 only"):
        onednn_matmul.matmul(torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="inner sizes differ"):
        onednn_matmul.matmul(torch.randn(2, 3), torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="both 3-D with the same batch"):
        onednn_matmul.matmul(torch.randn(2, 2, 3), torch.randn(3, 3, 2))
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        onednn_matmul.addmatmul_(torch.randn(3, 2).t(), torch.randn(2, 4), torch.randn(4, 3))


def _linear_grads(x, weight, use_extension):
    previous = onednn_matmul.set_enabled(use_extension)
    try:
        x = x.detach().clone().requires_grad_(True)
        weight = torch.nn.Parameter(weight.detach().clone())
        y = fast_linear.linear(x, weight)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return x.grad, weight.grad
    finally:
        onednn_matmul.set_enabled(previous)


@needs_extension
@pytest.mark.skipif(not fast_linear._ENABLED, reason="oneDNN linear unavailable or disabled")
def test_linear_weight_gradient_through_the_extension(monkeypatch):
    torch.manual_seed(0)
    x, weight = torch.randn(3, 11, 48), torch.randn(40, 48)
    calls = []
    real = onednn_matmul.matmul
    monkeypatch.setattr(onednn_matmul, "matmul", lambda a, b: calls.append(a.shape) or real(a, b))
    grads = _linear_grads(x, weight, True)
    assert calls == [(40, 33)]  # grad^T [out, N] read as a transposed view
    plain = _linear_grads(x, weight, False)
    x.requires_grad_(True), weight.requires_grad_(True)
    ref_x, ref_w = torch.autograd.grad((F.linear(x, weight) * torch.linspace(-1, 1, 3 * 11 * 40).view(3, 11, 40))
                                       .sum(), (x, weight))
    for ours, other, ref in zip(grads, plain, (ref_x, ref_w)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(other, ref, rtol=1e-5, atol=1e-4)


@needs_extension
@pytest.mark.parametrize("bias_shape", ["1H", "B1", "BH", "none"])
def test_training_attention_through_the_extension_equals_the_plain_path(bias_shape, monkeypatch):
    torch.manual_seed(0)
    b, heads, q_len, k_len, d_kv = 2, 4, 5, 7, 8
    # q/k/v as the model makes them: views of one projection output (not contiguous)
    qkv = torch.randn(b, q_len, 3, heads, d_kv).permute(2, 0, 3, 1, 4)
    q = qkv[0].clone().requires_grad_(True)
    k, v = (torch.randn(b, k_len, heads, d_kv).transpose(1, 2).requires_grad_(True) for _ in range(2))
    bias = None
    if bias_shape != "none":
        shape = {"1H": (1, heads), "B1": (b, 1), "BH": (b, heads)}[bias_shape] + (q_len, k_len)
        bias = torch.randn(shape, requires_grad=True)
    upstream = torch.randn(b, heads, q_len, d_kv)
    inputs = (q, k, v) + (() if bias is None else (bias,))
    calls = []
    real = onednn_matmul.matmul
    monkeypatch.setattr(onednn_matmul, "matmul", lambda a, c: calls.append(1) or real(a, c))
    results = []
    for use_extension in (True, False):
        previous = onednn_matmul.set_enabled(use_extension)
        try:
            out = attention_ops.biased_attention(q, k, v, bias)
            results.append((out, *torch.autograd.grad((out * upstream).sum(), inputs)))
        finally:
            onednn_matmul.set_enabled(previous)
        if use_extension:
            # forward: scores (matmul, or addmatmul_ with a bias) and context; backward: two GEMMs for each
            assert len(calls) == (2 if bias is None else 1) + 4
    for ours, plain in zip(*results):
        assert ours.shape == plain.shape
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


def test_a_failed_build_warns_once_and_callers_keep_working(failing_build, caplog):
    failing_build(onednn_matmul.LIBRARY, "Error building extension 'cpm2_onednn_matmul': g++: not found")
    with caplog.at_level(logging.WARNING, logger="cpm2"):
        assert not onednn_matmul.available()
        assert not onednn_matmul.available()
    warnings = [r.getMessage() for r in caplog.records if "cpm2_onednn_matmul" in r.getMessage()]
    assert len(warnings) == 1 and "g++: not found" in warnings[0]
    assert "g++: not found" in onednn_matmul.failure()
    q, k, v = (torch.randn(1, 2, 3, 4, requires_grad=True) for _ in range(3))
    out = attention_ops.biased_attention(q, k, v, torch.zeros(1, 2, 3, 3))
    out.sum().backward()
    assert q.grad is not None


def test_turned_off_by_environment(monkeypatch):
    library = onednn_matmul.LIBRARY
    monkeypatch.setattr(library, "_loaded", None)
    monkeypatch.setattr(library, "_failure", None)
    monkeypatch.setenv("CPM2_CPU_EXTENSION", "0")
    monkeypatch.setattr(library, "_build", lambda: pytest.fail("built although turned off"))
    assert not onednn_matmul.available()
    assert "CPM2_CPU_EXTENSION=0" in onednn_matmul.failure()
    assert not onednn_matmul.usable(torch.randn(2))
