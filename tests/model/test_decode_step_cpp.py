"""model/csrc/decode_step.cpp: the C++ decode layers equal the Python flat step (and so the module path, which
test_decode_step.py compares with whichever runs), its attention kernel equals the bmm version on every cache
and bias layout, and without the library the Python step runs after one warning."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from model import decode_step
from model.fast_inference import single_query_attention
from model.generation import GenerationConfig, generate
from mpu import fast_linear

from test_decode_step import _model, _run

needs_library = pytest.mark.skipif(os.environ.get("CPM2_CPU_EXTENSION", "1") == "0",
                                   reason="CPM2_CPU_EXTENSION=0 turns the C++ libraries off")


@pytest.fixture
def python_step(monkeypatch):
    """Make decode_step take its Python loop (as on a machine where the library cannot be built)."""
    def use_python():
        monkeypatch.setattr(decode_step.LIBRARY, "_loaded", False)
    return use_python


@needs_library
def test_library_builds_here():
    assert decode_step.LIBRARY.available(), decode_step.LIBRARY.failure()


@needs_library
@pytest.mark.parametrize("beams", [1, 3])
def test_cpp_layers_equal_the_python_step(monkeypatch, python_step, beams):
    model, enc, mask = _model()
    plans = []
    real_plan = decode_step.StepPlan

    def recording_plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return plans[-1]
    monkeypatch.setattr(decode_step, "StepPlan", recording_plan)
    cpp = _run(model, enc, mask, fast=True, monkeypatch=monkeypatch, beams=beams)
    assert plans and plans[0].cpp is not None  # the C++ layers ran
    python_step()
    plans.clear()
    python = _run(model, enc, mask, fast=True, monkeypatch=monkeypatch, beams=beams)
    assert plans and plans[0].cpp is None
    torch.testing.assert_close(cpp, python, rtol=0, atol=1e-5)
    assert torch.equal(cpp.argmax(-1), python.argmax(-1))


@needs_library
def test_cpp_path_is_not_taken_where_it_does_not_apply(monkeypatch):
    model, enc, mask = _model()
    with torch.inference_mode():
        assert decode_step.StepPlan(model).cpp is None  # weights not packed: no packed_weights block
        with fast_linear.packed_weights():
            assert decode_step.StepPlan(model).cpp is not None
            with monkeypatch.context() as m:  # bf16: the Python loop, and no build is attempted for it
                m.setattr(decode_step.LIBRARY, "available", lambda: pytest.fail("build tried for a bf16 model"))
                assert decode_step.StepPlan(model.to(torch.bfloat16)).cpp is None
        model.float()
        monkeypatch.setattr(decode_step.mpu, "get_model_parallel_world_size", lambda: 2)
        with fast_linear.packed_weights():
            assert decode_step.StepPlan(model).cpp is None  # model parallel: all-reduces between sublayers


def _attention_inputs(rows, examples, heads, length, dk, *, growable: bool):
    gen = torch.Generator().manual_seed(rows * 7 + examples + length)
    qkv = torch.randn(rows, 1, 3 * heads * dk, generator=gen)
    q = qkv.view(rows, 3, heads, dk)[:, 0]  # a strided view, as the C++ step makes it
    if growable:  # self-attention: views into buffers with spare positions
        k = torch.randn(examples, heads, length + 5, dk, generator=gen)[:, :, :length]
        v = torch.randn(examples, heads, length + 5, dk, generator=gen)[:, :, :length]
    else:
        k, v = (torch.randn(examples, heads, length, dk, generator=gen) for _ in range(2))
    return q, k, v


LAYOUTS = {"one-row-per-example": (6, 6, 16), "beams-share-kv": (6, 2, 16), "dk-not-a-multiple-of-16": (4, 4, 20)}
CASES = [(bias, layout) for layout in LAYOUTS for bias in ("none", "position", "mask-rows", "masked-keys")]
CASES.append(("mask-examples", "beams-share-kv"))  # a bias with one row per example (not per beam)


@needs_library
@pytest.mark.parametrize("bias,layout", CASES, ids=[f"{b}-{layout}" for b, layout in CASES])
def test_attention_kernel_equals_bmm_attention(bias, layout):
    rows, examples, dk = LAYOUTS[layout]
    heads, length = 3, 13
    q, k, v = _attention_inputs(rows, examples, heads, length, dk, growable=examples == rows)
    gen = torch.Generator().manual_seed(9)
    b = {"none": None,
         "position": torch.randn(1, heads, 7, length + 2, generator=gen)[:, :, 3:4, :length],
         "mask-rows": torch.randn(rows, 1, 1, length, generator=gen),
         "mask-examples": torch.randn(examples, 1, 1, length, generator=gen),
         "masked-keys": torch.zeros(rows, 1, 1, length).index_fill_(3, torch.tensor([0, 5, 12]),
                                                                      torch.finfo(torch.float32).min / 2)}[bias]
    ours = torch.ops.cpm2.single_query_attention(q, k, v, b)
    if bias == "mask-examples":  # the reference takes a per-row bias
        b = b.repeat_interleave(rows // examples, dim=0)
    reference = single_query_attention(q.unsqueeze(2), k, v, b).reshape(rows, 1, heads * dk)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


@needs_library
def test_attention_kernel_refuses_what_it_cannot_do():
    q, k, v = _attention_inputs(5, 2, 3, 4, 8, growable=False)
    with pytest.raises(RuntimeError, match="cannot share K/V"):
        torch.ops.cpm2.single_query_attention(q, k, v, None)
    q, k, v = _attention_inputs(4, 4, 3, 4, 8, growable=False)
    with pytest.raises(RuntimeError, match="attention bias of shape"):
        torch.ops.cpm2.single_query_attention(q, k, v, torch.zeros(4, 3, 2, 4))
    with pytest.raises(RuntimeError, match="float32 only"):
        torch.ops.cpm2.single_query_attention(q.double(), k.double(), v.double(), None)


def test_without_the_library_generate_runs_the_python_step_after_one_warning(monkeypatch, failing_build, caplog):
    failing_build(decode_step.LIBRARY, "Error building extension 'cpm2_decode_step': c++: command not found")
    model, enc, mask = _model()
    cfg = GenerationConfig(max_length=6, min_length=6, num_beams=1, eos_id=2, pad_id=0, decoder_prefix=[0])
    with caplog.at_level(logging.WARNING, logger="cpm2"):
        first = generate(model, enc, mask, cfg)
        second = generate(model, enc, mask, cfg)
    warnings = [r.getMessage() for r in caplog.records if "cpm2_decode_step" in r.getMessage()]
    assert len(warnings) == 1 and "command not found" in warnings[0] and "Python" in warnings[0]
    assert torch.equal(first, second) and first.shape == (3, 6)
    monkeypatch.setattr(decode_step, "supports", lambda *a, **k: False)
    assert torch.equal(first, generate(model, enc, mask, cfg))  # the module path agrees


@needs_library
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16])
@pytest.mark.parametrize("n,k", [(48, 40), (37, 33)], ids=["n-multiple-of-16", "n-and-k-odd"])
def test_panel_gemm_equals_f_linear(rows, n, k):
    gen = torch.Generator().manual_seed(rows * 100 + n)
    weight, x = torch.randn(n, k, generator=gen), torch.randn(rows, 1, k, generator=gen)
    panels = torch.ops.cpm2.pack_panels(weight)
    assert panels.shape == ((n + 15) // 16, k, 16)
    out = torch.ops.cpm2.panel_linear(x, panels, n)
    assert out.shape == (rows, 1, n)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)
    strided = torch.randn(k, rows, generator=gen).t()  # a non-contiguous input
    torch.testing.assert_close(torch.ops.cpm2.panel_linear(strided, panels, n),
                               torch.nn.functional.linear(strided, weight), rtol=1e-5, atol=1e-5)


@needs_library
def test_panel_gemm_refuses_more_rows_than_it_holds():
    panels = torch.ops.cpm2.pack_panels(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        torch.ops.cpm2.panel_linear(torch.randn(17, 8), panels, 32)


@needs_library
@pytest.mark.parametrize("rows,panels", [(3, True), (16, True), (17, False)])
def test_plan_takes_panels_for_few_rows_and_onednn_otherwise(rows, panels):
    model, _, _ = _model()
    with torch.inference_mode(), fast_linear.packed_weights():
        plan = decode_step.StepPlan(model, rows)
        linears = [w for i, w in enumerate(plan.cpp[0]) if i % 9 not in (0, 3, 6)]  # skip the norm weights
        assert all((w.dim() == 3 and not w.is_mkldnn) == panels for w in linears)
        again = decode_step.StepPlan(model, rows)  # the forms are made once per packed_weights block
        assert all(a is b for a, b in zip(plan.cpp[0], again.cpp[0]))
