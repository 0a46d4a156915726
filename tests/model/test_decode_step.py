"""model/decode_step.py (the flat decode step CachedDecoder uses) equals the module path, step by step.

MP 2 is covered by tests/model/test_generation_parallel.py (generate runs this path there too)."""
import pytest
import torch

from model import decode_step
from model.generation import GenerationConfig, generate
from model.generation.cached_decoder import CachedDecoder
from mpu import fast_linear

from test_fast_inference import _model as fast_inference_model


def _model(dtype=torch.float32):
    model, enc, mask = fast_inference_model()  # the 2+3-layer model and masked batch of test_fast_inference
    return model.to(dtype), enc, mask


def _run(model, enc, mask, *, fast: bool, monkeypatch, beams: int = 1, steps: int = 9):
    """Logits of a prefix call and `steps` decode steps (beam-style row expansion and reorders when beams > 1)."""
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(decode_step, "supports", lambda *a, **k: False)
        calls = []
        real = decode_step.decode_step
        m.setattr(decode_step, "decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
        with torch.inference_mode(), fast_linear.packed_weights():
            decoder = CachedDecoder(model, enc, mask, mask, capacity=1 + steps)
            logits = [decoder.start(torch.zeros(enc.size(0), 1, dtype=torch.long))]
            if beams > 1:
                decoder.expand_rows(beams)
                logits[0] = logits[0].repeat_interleave(beams, dim=0)
            gen = torch.Generator().manual_seed(5)
            for i in range(steps):
                tokens = logits[-1].argmax(-1)
                if beams > 1 and i % 2 == 1:  # move rows within each example, as beam search does
                    rows = torch.arange(tokens.numel()).view(-1, beams)
                    rows = torch.stack([r[torch.randperm(beams, generator=gen)] for r in rows]).flatten()
                    decoder.reorder_rows(rows)
                    tokens = tokens[rows]
                logits.append(decoder.step(tokens))
    assert (len(calls) == steps) if fast else not calls
    return torch.stack(logits)


@pytest.mark.parametrize("beams", [1, 3])
def test_fast_step_equals_the_module_path(monkeypatch, beams):
    model, enc, mask = _model()
    fast = _run(model, enc, mask, fast=True, monkeypatch=monkeypatch, beams=beams)
    slow = _run(model, enc, mask, fast=False, monkeypatch=monkeypatch, beams=beams)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))


def test_fast_step_equals_the_module_path_in_bf16(monkeypatch):
    model, enc, mask = _model(torch.bfloat16)
    fast = _run(model, enc, mask, fast=True, monkeypatch=monkeypatch)
    slow = _run(model, enc, mask, fast=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-2)


def test_fast_step_is_what_generate_uses_and_gives_the_same_tokens(monkeypatch):
    model, enc, mask = _model()
    cfg = GenerationConfig(max_length=8, min_length=8, num_beams=1, eos_id=2, pad_id=0, decoder_prefix=[0])
    calls = []
    real = decode_step.decode_step
    monkeypatch.setattr(decode_step, "decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = generate(model, enc, mask, cfg)
    assert len(calls) == 7  # every step after the prefix call
    monkeypatch.setattr(decode_step, "supports", lambda *a, **k: False)
    assert torch.equal(fast, generate(model, enc, mask, cfg))


def test_supports_only_the_cases_it_implements():
    model, enc, mask = _model()
    with torch.inference_mode():
        decoder = CachedDecoder(model, enc, mask, mask, capacity=4)
        decoder.start(torch.zeros(3, 1, dtype=torch.long))
        decoder.step(torch.ones(3, dtype=torch.long))  # makes the cache growable
        past = decoder.past
        assert decode_step.supports(model, past)
        assert not decode_step.supports(model, [dict(layer) for layer in past])  # a plain cache: module path
        assert not decode_step.supports(torch.nn.Sequential(model), past)  # wrappers keep their own forward
        assert not decode_step.supports(model.half(), past)  # fp16: fp32 feed-forward and clamping live there
        model.float().train()
        assert not decode_step.supports(model, past)
    with torch.enable_grad():
        assert not decode_step.supports(model.eval(), past)


@pytest.mark.skipif(not fast_linear._ENABLED, reason="oneDNN linear unavailable or disabled")
def test_linear_pair_equals_two_linears_and_sees_weight_changes():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(20, 16)), torch.nn.Parameter(torch.randn(12, 16))
    x = torch.randn(3, 1, 16)
    with torch.inference_mode(), fast_linear.packed_weights():
        ya, yb = fast_linear.linear_pair(x, a, b)
        torch.testing.assert_close(ya, x @ a.t(), rtol=0, atol=1e-5)
        torch.testing.assert_close(yb, x @ b.t(), rtol=0, atol=1e-5)
        with torch.no_grad():
            b.mul_(2.0)  # bumps the version: the packed pair must be rebuilt
        torch.testing.assert_close(fast_linear.linear_pair(x, a, b)[1], x @ b.t(), rtol=0, atol=1e-5)
    ya, yb = fast_linear.linear_pair(x, a, b)  # outside a block: two plain calls
    torch.testing.assert_close(yb, x @ b.t(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "aten"])
def test_fp32_rms_norm_equals_the_written_out_formula(fused):
    from model.transformer import rms_norm
    from mpu import fused_ops

    torch.manual_seed(0)
    x, w = torch.randn(4, 3, 48) * 3, torch.randn(48)
    reference = w * (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6))
    previous = fused_ops.set_enabled(fused)
    try:
        if fused:  # mpu/fused_ops.py: the same maths, summed in another order
            torch.testing.assert_close(rms_norm(x, w, 1e-6), reference, rtol=1e-6, atol=1e-6)
        else:  # torch.rms_norm: bit-identical
            assert torch.equal(rms_norm(x, w, 1e-6), reference)
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (rms_norm(xr, wr, 1e-6) * torch.arange(48.0)).sum().backward()
    finally:
        fused_ops.set_enabled(previous)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    (ws * (xs * torch.rsqrt(xs.pow(2).mean(dim=-1, keepdim=True) + 1e-6)) * torch.arange(48.0)).sum().backward()
    torch.testing.assert_close(xr.grad, xs.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wr.grad, ws.grad, rtol=1e-5, atol=1e-5)
