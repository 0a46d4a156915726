"""One incremental decoder step (one new token per row) as a flat loop over the layers' weights.

Why: a decode step of the benchmark model (6 layers, batch 8) is ~3-4 ms of weight streaming in its GEMMs and
~0.7 ms of attention over the caches; walking the module tree around them (about 25 ``nn.Module`` calls and 300
small ops per step, masks and position bias rebuilt every step) cost ~1 ms more (step 6.1 ms; this path: ~5.4 ms,
benchmarks/RESULTS.md). This function runs the same
maths as ``EncDecModel.decode`` + ``Block.forward`` for ``Lq = 1`` with none of that: the cross-attention bias is
built once per ``generate`` call (:func:`cross_bias_for_steps`), the position bias is one row of the stack's table,
``wi_0`` / ``wi_1`` run as one GEMM on their concatenated packed weight, and the self K/V go straight into the
growable cache buffers (model/fast_inference.py). Equality with the module path is tested
(tests/model/test_decode_step.py), tokens and logits, greedy and beam, MP 1 and 2.

At model-parallel size 1 with packed fp32 weights, the layers run in C++ instead (model/csrc/decode_step.cpp,
built on first use; ``LIBRARY``): the same maths with fused kernels and, for at most 16 rows, its own GEMM on
16-column weight panels: ~2 ms less per step of the benchmark model (5 -> 3 ms);
the Python loop below stays for model parallelism, bf16, and machines where the library cannot be built.

Used by ``CachedDecoder.step`` when :func:`supports` says so: an ``EncDecModel`` in eval mode, fp32 or bf16
(fp16 keeps the module path with its fp32 feed-forward and clamping), gradients off, self K/V in growable buffers.
"""
from __future__ import annotations

import pathlib
from typing import Optional

import torch

import mpu
from mpu import fast_linear
from mpu.cpp_extension import CppLibrary

from .attention_ops import split_heads
from .fast_inference import GrowableLayerCache, append_kv, single_query_attention
from .transformer import gated_gelu, rms_norm


LIBRARY = CppLibrary(
    "cpm2_decode_step", pathlib.Path(__file__).resolve().parent / "csrc" / "decode_step.cpp",
    fallback="Decode steps run from Python (about 1.5 ms more per step of a 6-layer model)",
    cflags=("-O3", "-fopenmp"), ldflags=("-fopenmp",))


def supports(model: torch.nn.Module, past: Optional[list]) -> bool:
    from .enc_dec_modeling import EncDecModel

    if type(model) is not EncDecModel or model.training or torch.is_grad_enabled():
        return False
    if not past or not isinstance(past[0], GrowableLayerCache):
        return False
    return model.lm_head.weight.dtype in (torch.float32, torch.bfloat16)


def cross_bias_for_steps(cross_attention_mask: Optional[torch.Tensor], enc_len: int, dtype: torch.dtype,
                         device: torch.device) -> Optional[torch.Tensor]:
    """The additive cross-attention bias of a decode step ``[B, 1, 1, Le]`` (or None), as ``EncDecModel.decode``
    builds it from a ``[B, Le]`` mask; constant over the steps of one ``generate`` call."""
    from .enc_dec_modeling import additive_mask

    return additive_mask(cross_attention_mask, q_len=1, k_len=enc_len, dtype=dtype, device=device,
                         name="cross_attention_mask")


class StepPlan:
    """The decoder's weights for decode steps, fetched once per ``generate`` call: norms as (weight, eps), the
    linear layers bound to their packed copies (``fast_linear.bind``), so a step does no module attribute lookups
    and no packed-weight cache lookups. Valid while the weights do not change (one ``generate`` call)."""

    def __init__(self, model: torch.nn.Module, rows: Optional[int] = None) -> None:
        decoder = model.decoder
        self.position_attention = decoder.blocks[0].self_attn.self_attn
        self.final_norm = decoder.final_layernorm
        self.layers = [_LayerPlan(block) for block in decoder.blocks]
        self.rows = rows  # rows per step (examples x beams); None: unknown, oneDNN's packed weights
        self.cpp = _cpp_plan(decoder.blocks, rows)


class _LayerPlan:
    def __init__(self, block) -> None:
        attn, cross, ff = block.self_attn.self_attn, block.cross_attn.cross_attn, block.ff.dense_relu_dense
        self.heads, self.d_kv = attn.heads, attn.d_kv
        self.norms = tuple((sub.layer_norm.weight, sub.layer_norm.eps)
                           for sub in (block.self_attn, block.cross_attn, block.ff))
        self.qkv, self.self_out = fast_linear.bind(attn.project.weight), fast_linear.bind(attn.dense.weight)
        self.q, self.cross_out = fast_linear.bind(cross.project_q.weight), fast_linear.bind(cross.dense.weight)
        self.wi, self.wo = fast_linear.bind_pair(ff.wi_0.weight, ff.wi_1.weight), fast_linear.bind(ff.wo.weight)


PANEL_ROWS = 16  # up to this many rows per step the linear layers use the C++ panel GEMM (16-column panels)


def _linear_form(weights: tuple[torch.Tensor, ...], rows: Optional[int]) -> torch.Tensor:
    """One linear layer's weight (or the concatenation of a pair) as the C++ step takes it: 16-column panels
    ``[N/16, K, 16]`` when a step has at most PANEL_ROWS rows (oneDNN's kernel streams weights at about half the
    read bandwidth for so few rows; model/csrc/decode_step.cpp), else oneDNN's packed layout."""
    if rows is not None and rows <= PANEL_ROWS and sum(w.size(0) for w in weights) % 16 == 0:
        return fast_linear.cached_form("panels", weights, lambda *ws: torch.ops.cpm2.pack_panels(
            torch.cat(ws) if len(ws) > 1 else ws[0]))
    return fast_linear.packed_weight(weights[0]) if len(weights) == 1 else fast_linear.packed_pair(*weights)


def _cpp_plan(blocks, rows: Optional[int]) -> Optional[tuple[list[torch.Tensor], list[float], int, int]]:
    """The inputs of ``torch.ops.cpm2.decode_layers`` that stay fixed through one ``generate`` call (weights, the
    linear ones packed for ``rows`` rows per step, in model/csrc/decode_step.cpp's order; norm epsilons; heads;
    d_kv), or None where that path does not apply: model parallelism (its all-reduces are Python calls), weights
    that are not packed fp32 (bf16, outside a packed_weights block), or the library not built."""
    if mpu.get_model_parallel_world_size() != 1:
        return None
    layers, shapes = [], set()
    for block in blocks:
        attn, cross, ff = block.self_attn.self_attn, block.cross_attn.cross_attn, block.ff.dense_relu_dense
        norms = [sub.layer_norm for sub in (block.self_attn, block.cross_attn, block.ff)]
        linears = (attn.project.weight, attn.dense.weight, cross.project_q.weight, cross.dense.weight,
                   ff.wi_0.weight, ff.wi_1.weight, ff.wo.weight)
        if not fast_linear._packable(*linears) or ff.wi_0.weight.shape != ff.wi_1.weight.shape \
                or any(norm.weight.dtype != torch.float32 or norm.weight.device.type != "cpu" for norm in norms):
            return None
        layers.append((norms, linears))
        shapes.add((attn.heads, attn.d_kv, cross.heads, cross.d_kv))
    if len(shapes) != 1 or not LIBRARY.available():  # checked last: only CPU fp32 models build the library
        return None
    weights, eps = [], []
    for norms, linears in layers:
        qkv, self_out, q, cross_out, wi_0, wi_1, wo = linears
        weights += [norms[0].weight, _linear_form((qkv,), rows), _linear_form((self_out,), rows), norms[1].weight,
                    _linear_form((q,), rows), _linear_form((cross_out,), rows), norms[2].weight,
                    _linear_form((wi_0, wi_1), rows), _linear_form((wo,), rows)]
        eps += [float(norm.eps) for norm in norms]
    heads, d_kv, cross_heads, cross_d_kv = shapes.pop()
    return (weights, eps, heads, d_kv) if (heads, d_kv) == (cross_heads, cross_d_kv) else None


def decode_step(model: torch.nn.Module, tokens: torch.Tensor, past: list[GrowableLayerCache],
                cross_bias: Optional[torch.Tensor], plan: Optional[StepPlan] = None,
                ) -> tuple[torch.Tensor, list[GrowableLayerCache]]:
    """``tokens [N]`` (one new token per row) -> (final hidden ``[N, 1, d]``, the cache one position longer).

    ``past`` is consumed (its buffers receive the new K/V), as with the module path's growable cache. ``plan``:
    a :class:`StepPlan` of ``model`` made in the same ``generate`` call (built here when None).
    """
    if plan is None or (plan.rows is not None and plan.rows != tokens.numel()):
        plan = StepPlan(model, tokens.numel())
    offset = past[0]["self_k"].size(2)
    h = model.word_embeds(tokens[:, None])  # [N, 1, d]
    self_bias = plan.position_attention.position_bias(1, offset + 1, offset, h.device).to(h.dtype)  # [1,Hp,1,L+1]
    if plan.cpp is not None and h.dtype == torch.float32 and h.device.type == "cpu":
        # _layer_step's maths in C++ with fused kernels and, for few rows, its panel GEMM (model/csrc/decode_step.cpp)
        weights, eps, heads, d_kv = plan.cpp
        h, keys, values = torch.ops.cpm2.decode_layers(
            h, weights, eps, heads, d_kv, [c["self_k"] for c in past], [c["self_v"] for c in past],
            [c["cross_k"] for c in past], [c["cross_v"] for c in past], self_bias, cross_bias)
        return plan.final_norm(h), [GrowableLayerCache(self_k=k, self_v=v, cross_k=c["cross_k"], cross_v=c["cross_v"])
                                    for k, v, c in zip(keys, values, past)]
    new_past = []
    for layer, cache in zip(plan.layers, past):
        h, layer_cache = _layer_step(layer, h, cache, self_bias, cross_bias)
        new_past.append(layer_cache)
    return plan.final_norm(h), new_past


def _layer_step(layer: _LayerPlan, h: torch.Tensor, cache: GrowableLayerCache, self_bias: torch.Tensor,
                cross_bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, GrowableLayerCache]:
    n, heads, d_kv = h.size(0), layer.heads, layer.d_kv
    (self_norm, self_eps), (cross_norm, cross_eps), (ff_norm, ff_eps) = layer.norms
    # self-attention (pre-norm, residual); the new K/V are written into the cache buffers
    q, k, v = split_heads(layer.qkv(rms_norm(h, self_norm, self_eps)), 3, heads, d_kv)
    k, v = append_kv(cache["self_k"], k), append_kv(cache["self_v"], v)
    context = single_query_attention(q, k, v, self_bias).reshape(n, 1, heads * d_kv)
    h = h + mpu.reduce_from_model_parallel_region(layer.self_out(context))
    # cross-attention on the cached encoder K/V
    (q,) = split_heads(layer.q(rms_norm(h, cross_norm, cross_eps)), 1, heads, d_kv)
    context = single_query_attention(q, cache["cross_k"], cache["cross_v"], cross_bias).reshape(n, 1, heads * d_kv)
    h = h + mpu.reduce_from_model_parallel_region(layer.cross_out(context))
    # gated-GeLU feed-forward, wi_0 and wi_1 in one GEMM
    gate, lin = layer.wi(rms_norm(h, ff_norm, ff_eps))
    h = h + mpu.reduce_from_model_parallel_region(layer.wo(gated_gelu(gate, lin)))
    return h, GrowableLayerCache(self_k=k, self_v=v, cross_k=cache["cross_k"], cross_v=cache["cross_v"])
