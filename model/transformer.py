"""Building blocks of the CPM-2 / T5 v1.1 encoder-decoder (SPEC §2, reference/original-toolkit.md §2.2).

Layout: pre-norm residual blocks ``h = h + Dropout(Sublayer(RMSNorm(h)))``; no biases anywhere; attention
scores are unscaled (T5 folds 1/sqrt(d_kv) into the init); the relative position bias table lives in block 0 of
each stack and its bias is computed once per forward and shared by every block of that stack.

Module names reproduce the released checkpoint (``self_attn.self_attn.project``, ``ff.dense_relu_dense.wi_0``):
the doubled ``self_attn`` is the sublayer wrapper (norm + residual) around the attention proper, and
``dense_relu_dense`` is a historical name for the gated-GeLU FF.

Shapes: B batch, Lq/Lk query/key lengths, d = d_model, H heads (Hp = H / mp on this rank), dk = d_kv.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import mpu
from mpu import fused_ops
from mpu.layers import InitMethod

from .attention_ops import biased_attention, split_heads
from .configuration_enc_dec import EncDecConfig
from .fast_inference import GrowableLayerCache, append_kv, single_query_attention

LayerCache = dict[str, torch.Tensor]  # {"self_k", "self_v", "cross_k", "cross_v"}: [B, Hp, L, dk]


# --------------------------------------------------------------------------------------------------------------
# Pure numerics (module-level functions so tests can swap them for deliberately wrong variants)

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5 RMSNorm ``weight * x * rsqrt(mean(x^2) + eps)``: statistics in fp32, cast back to the input dtype, no
    mean subtraction, no bias. ``x [*, d]`` -> ``[*, d]``."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if fused_ops.usable(x, weight):
            # One pass forward and backward (mpu/fused_ops.py), with or without gradients: an activation-
            # checkpointed forward (no grad) and its recomputation (grad) must compute the same values.
            return fused_ops.rms_norm(x, weight, eps)
        # One call for the same maths (bit-identical in fp32, tested)
        return torch.rms_norm(x, (x.size(-1),), weight, eps)
    variance = x.float().pow(2).mean(dim=-1, keepdim=True)  # [*, 1]
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def gated_gelu(gate: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * linear`` (T5 v1.1 "gated-gelu"; tanh approximation as in the original)."""
    if fused_ops.usable(gate, linear) and gate.shape == linear.shape:
        return fused_ops.gated_gelu(gate, linear)  # one pass forward and backward (mpu/fused_ops.py)
    return F.gelu(gate, approximate="tanh") * linear


def score_scale(d_kv: int) -> float:
    """Multiplier of ``Q K^T``: 1.0, because T5 (and CPM-2) do not scale scores by 1/sqrt(d_kv)."""
    return 1.0


def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucketing of ``key_pos - query_pos`` (Mesh-TF ``_relative_position_bucket``; HF ``modeling_t5``).

    Bidirectional: half the buckets for keys after the query. In each half, the first half of the buckets are exact
    distances, the rest are log-spaced up to ``max_distance`` (larger distances share the last bucket).
    Unidirectional (decoder): only keys at or before the query count; later keys map to bucket 0.
    ``relative_position`` long ``[*]`` -> bucket ids long ``[*]`` in ``[0, num_buckets)``.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets; distance is >= max_exact where this branch is used (clamp avoids log(0) elsewhere)
    large = max_exact + (
        torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Keep fp16 activations finite (HF T5's clamp, in one place): inf -> +-(max - 1000). No-op for other dtypes."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(min=-limit, max=limit)


def _parallel_dropout_context(active: bool):
    """Dropout on MP-sharded activations draws from the model-parallel RNG stream; skip the fork when inactive."""
    return mpu.get_rng_tracker().fork() if active else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------
# Modules

class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head attention, self (fused ``project`` = [Q; K; V]) or cross (``project_q``, ``project_kv`` = [K; V]).

    Heads are split over model-parallel ranks: the fused weights use stride 3 / 2 so that each rank holds
    ``[Q_r; K_r; V_r]`` (``[K_r; V_r]``) of the same heads. The additive ``attn_bias`` (mask + position bias)
    enters ``scaled_dot_product_attention`` as one float mask with ``scale=1.0``: one kernel, one softmax; in
    training on CPU, :func:`attention_ops.biased_attention` computes the same thing for less.
    """

    def __init__(self, config: EncDecConfig, *, cross: bool, has_relative_bias: bool, bidirectional: bool,
                 init_method: InitMethod, output_init_method: InitMethod) -> None:
        super().__init__()
        mp = mpu.get_model_parallel_world_size()
        self.cross, self.bidirectional = cross, bidirectional
        self.d_kv, self.dropout_rate = config.d_kv, config.dropout_rate
        self.heads = mpu.divide(config.num_heads, mp, what="num_heads")  # Hp
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        inner = config.num_heads * config.d_kv
        if cross:
            self.project_q = mpu.ColumnParallelLinear(config.d_model, inner, init_method=init_method)
            self.project_kv = mpu.ColumnParallelLinear(config.d_model, 2 * inner, init_method=init_method, stride=2)
        else:
            self.project = mpu.ColumnParallelLinear(config.d_model, 3 * inner, init_method=init_method, stride=3)
        self.dense = mpu.RowParallelLinear(inner, config.d_model, init_method=output_init_method)
        if has_relative_bias:
            # _weight skips nn.Embedding's own N(0, 1) init, which would consume the RNG per shard size.
            self.relative_attention_bias = nn.Embedding(
                self.num_buckets, self.heads, _weight=torch.empty(self.num_buckets, self.heads))
            mpu.initialize_parallel_weight(self.relative_attention_bias.weight, (self.num_buckets, config.num_heads),
                                           partition_dim=1, init_method=init_method)

    def position_bias(self, q_len: int, k_len: int, offset: int, device: torch.device) -> torch.Tensor:
        """Relative position bias ``[1, Hp, Lq, Lk]`` for queries at absolute positions ``offset..offset+Lq-1``."""
        if q_len == 1 and not torch.is_grad_enabled():
            # Decode step: slice one row of a table built once per (weights, length bucket) instead of redoing the
            # bucket maths every step; the values are the same (the bucket depends on key - query only).
            return self._decode_bias_table(k_len, device)[:, :, offset:offset + 1, :k_len]
        return self._position_bias(q_len, k_len, offset, device)

    def _decode_bias_table(self, k_len: int, device: torch.device) -> torch.Tensor:
        weight = self.relative_attention_bias.weight
        key = (weight._version, weight.data_ptr(), weight.dtype, device)
        cached = getattr(self, "_bias_table", None)
        if cached is None or cached[0] != key or cached[1].size(-1) < k_len:
            size = max(64, 1 << (k_len - 1).bit_length())
            cached = (key, self._position_bias(size, size, 0, device))
            self._bias_table = cached
        return cached[1]

    def _position_bias(self, q_len: int, k_len: int, offset: int, device: torch.device) -> torch.Tensor:
        query = torch.arange(offset, offset + q_len, device=device)[:, None]  # [Lq, 1]
        key = torch.arange(k_len, device=device)[None, :]  # [1, Lk]
        buckets = relative_position_bucket(key - query, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)
        values = self.relative_attention_bias(buckets)  # [Lq, Lk, Hp]
        return values.permute(2, 0, 1).unsqueeze(0)  # [1, Hp, Lq, Lk]

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """``[B, L, parts*Hp*dk]`` -> ``parts`` tensors ``[B, Hp, L, dk]`` (rows grouped [part][head][dk])."""
        return split_heads(x, parts, self.heads, self.d_kv)  # parts x [B, Hp, L, dk]

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor], *,
                kv_input: Optional[torch.Tensor] = None,
                past_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None, grow_in_place: bool = False,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            x: ``[B, Lq, d]`` normed hidden states (queries; also keys/values for self-attention).
            attn_bias: additive float ``[B or 1, Hp or 1, Lq, Lk]`` (0 = attend, very negative = masked), or None.
            kv_input: cross-attention only: encoder output ``[B, Lk, d]``; ignored when ``past_kv`` is given.
            past_kv: self-attention: K/V of earlier positions ``[B, Hp, L_past, dk]`` (new K/V are appended);
                cross-attention: the cached encoder K/V ``[B, Hp, Le, dk]`` (used as is, never recomputed).
            grow_in_place: self-attention ``past_kv`` are views of growable buffers (model/fast_inference.py):
                write the new K/V into them instead of concatenating.
        Returns:
            ``([B, Lq, d], (k, v))`` with the K/V to cache, ``[B, Hp, Lk, dk]``.
        """
        b, q_len, _ = x.shape
        if self.cross:
            (q,) = self._heads(self.project_q(x), 1)  # [B, Hp, Lq, dk]
            if past_kv is not None:
                k, v = past_kv
            else:
                if kv_input is None:
                    raise ValueError("cross-attention needs the encoder output or cached cross K/V")
                k, v = self._heads(self.project_kv(kv_input), 2)  # [B, Hp, Le, dk] each
        else:
            q, k, v = self._heads(self.project(x), 3)  # [B, Hp, Lq, dk] each
            if past_kv is not None and grow_in_place:
                k, v = append_kv(past_kv[0], k), append_kv(past_kv[1], v)  # [B, Hp, L_past + Lq, dk]
            elif past_kv is not None:
                k = torch.cat([past_kv[0], k], dim=2)  # [B, Hp, L_past + Lq, dk]
                v = torch.cat([past_kv[1], v], dim=2)
        dropout = self.dropout_rate if self.training else 0.0
        if q_len == 1 and dropout == 0.0:  # decode steps: two bmm beat SDPA's flash kernel for one query row
            context = single_query_attention(q, k, v, attn_bias)  # [B, Hp, 1, dk]
            return self.dense(context.transpose(1, 2).reshape(b, 1, self.heads * self.d_kv)), (k, v)
        if k.size(0) != b:  # cross K/V shared by beams (CachedDecoder.expand_rows): copy them per row here only
            k, v = k.repeat_interleave(b // k.size(0), dim=0), v.repeat_interleave(b // k.size(0), dim=0)
        # Attention-prob dropout acts on sharded heads: draw it from the model-parallel RNG stream.
        with _parallel_dropout_context(dropout > 0):
            # Training on CPU: the plain GEMM + softmax path (attention_ops.biased_attention says why), when this
            # attention trains (its weights or the position bias need gradients: the scores are then kept for the
            # backward anyway); a frozen attention (prompt tuning) keeps SDPA's flash kernel, which keeps no scores.
            # Chosen by train mode, device and requires_grad flags, not by grad mode, so that an activation-
            # checkpointing recompute takes the same path (and draws the same dropout mask) as the no-grad forward
            # it repeats. On GPU, SDPA's kernels (memory-efficient attention handles a bias that needs a gradient)
            # are the better choice.
            trains = self.dense.weight.requires_grad or (attn_bias is not None and attn_bias.requires_grad)
            if self.training and trains and q.device.type == "cpu" \
                    and score_scale(self.d_kv) == 1.0:
                context = biased_attention(q, k, v, attn_bias, dropout)  # [B, Hp, Lq, dk]
            else:
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout,
                                                         scale=score_scale(self.d_kv))  # [B, Hp, Lq, dk]
        context = context.transpose(1, 2).reshape(b, q_len, self.heads * self.d_kv)  # [B, Lq, Hp*dk]
        return self.dense(context), (k, v)


class GatedGeluFeedForward(nn.Module):
    """``wo(Dropout(gelu_tanh(wi_0 x) * wi_1 x))``; wi_0/wi_1 split on rows (d_ff), wo on columns.

    Under fp16 the gated product and ``wo`` run in fp32 (the weight is upcast on the fly) and the result is clamped
    before casting back: the product of two large fp16 activations overflows, which is why HF T5 keeps ``wo`` in
    fp32 (``_keep_in_fp32_modules``). bf16 has fp32's range and needs none of this.
    """

    def __init__(self, config: EncDecConfig, *, init_method: InitMethod, output_init_method: InitMethod) -> None:
        super().__init__()
        self.wi_0 = mpu.ColumnParallelLinear(config.d_model, config.d_ff, init_method=init_method)
        self.wi_1 = mpu.ColumnParallelLinear(config.d_model, config.d_ff, init_method=init_method)
        self.wo = mpu.RowParallelLinear(config.d_ff, config.d_model, init_method=output_init_method)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, d] -> [B, L, d]`` (hidden ``[B, L, d_ff/mp]``)."""
        gate, linear = self.wi_0(x), self.wi_1(x)  # [B, L, d_ff/mp] each
        if x.dtype == torch.float16:
            gate, linear = gate.float(), linear.float()
        hidden = gated_gelu(gate, linear)  # [B, L, d_ff/mp]
        with _parallel_dropout_context(self.training and self.dropout.p > 0):  # the hidden is sharded over MP
            hidden = self.dropout(hidden)
        out = self.wo(hidden)  # [B, L, d], fp32 under fp16 input
        if x.dtype == torch.float16:
            limit = torch.finfo(torch.float16).max - 1000
            out = out.clamp(min=-limit, max=limit).to(torch.float16)
        return out


class _PreNormResidual(nn.Module):
    """Shared part of the three sublayer wrappers: ``layer_norm`` and ``h + Dropout(out)`` (fp16-clamped)."""

    def __init__(self, config: EncDecConfig) -> None:
        super().__init__()
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def residual(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout.p > 0:
            out = self.dropout(out)
        return _clamp_fp16(h + out)


class SelfAttentionLayer(_PreNormResidual):
    def __init__(self, config: EncDecConfig, *, has_relative_bias: bool, bidirectional: bool,
                 init_method: InitMethod, output_init_method: InitMethod) -> None:
        super().__init__(config)
        self.self_attn = Attention(config, cross=False, has_relative_bias=has_relative_bias,
                                   bidirectional=bidirectional, init_method=init_method,
                                   output_init_method=output_init_method)

    def forward(self, h, attn_bias, past_kv=None, grow_in_place=False):
        out, kv = self.self_attn(self.layer_norm(h), attn_bias, past_kv=past_kv, grow_in_place=grow_in_place)
        return self.residual(h, out), kv


class CrossAttentionLayer(_PreNormResidual):
    def __init__(self, config: EncDecConfig, *, init_method: InitMethod, output_init_method: InitMethod) -> None:
        super().__init__(config)
        self.cross_attn = Attention(config, cross=True, has_relative_bias=False, bidirectional=True,
                                    init_method=init_method, output_init_method=output_init_method)

    def forward(self, h, enc_hidden, attn_bias, past_kv=None):
        out, kv = self.cross_attn(self.layer_norm(h), attn_bias, kv_input=enc_hidden, past_kv=past_kv)
        return self.residual(h, out), kv


class FeedForwardLayer(_PreNormResidual):
    def __init__(self, config: EncDecConfig, *, init_method: InitMethod, output_init_method: InitMethod) -> None:
        super().__init__(config)
        self.dense_relu_dense = GatedGeluFeedForward(config, init_method=init_method,
                                                     output_init_method=output_init_method)

    def forward(self, h):
        return self.residual(h, self.dense_relu_dense(self.layer_norm(h)))


class Block(nn.Module):
    """Encoder block (self-attn, FF) or decoder block (causal self-attn, cross-attn, FF)."""

    def __init__(self, config: EncDecConfig, *, layer_index: int, is_decoder: bool, init_method: InitMethod,
                 output_init_method: InitMethod) -> None:
        super().__init__()
        self.layer_index, self.is_decoder = layer_index, is_decoder
        inits = dict(init_method=init_method, output_init_method=output_init_method)
        self.self_attn = SelfAttentionLayer(config, has_relative_bias=layer_index == 0,
                                            bidirectional=not is_decoder, **inits)
        if is_decoder:
            self.cross_attn = CrossAttentionLayer(config, **inits)
        self.ff = FeedForwardLayer(config, **inits)

    def forward(self, h: torch.Tensor, self_bias: Optional[torch.Tensor], enc_hidden: Optional[torch.Tensor] = None,
                cross_bias: Optional[torch.Tensor] = None, past: Optional[LayerCache] = None,
                ) -> tuple[torch.Tensor, Optional[LayerCache]]:
        """``h [B, Lq, d]`` -> ``(h [B, Lq, d], cache)``; the cache (decoder only) holds this layer's K/V."""
        self_past = (past["self_k"], past["self_v"]) if past is not None else None
        grow = isinstance(past, GrowableLayerCache)  # the returned cache stays growable
        h, (self_k, self_v) = self.self_attn(h, self_bias, past_kv=self_past, grow_in_place=grow)
        if not self.is_decoder:
            return self.ff(h), None
        cross_past = (past["cross_k"], past["cross_v"]) if past is not None else None
        h, (cross_k, cross_v) = self.cross_attn(h, enc_hidden, cross_bias, past_kv=cross_past)
        cache = {"self_k": self_k, "self_v": self_v, "cross_k": cross_k, "cross_v": cross_v}
        return self.ff(h), (GrowableLayerCache(cache) if grow else cache)


class Stack(nn.Module):
    """A stack of blocks plus the final RMSNorm. Block 0 owns the relative bias table; the bias is computed once
    here and added to the mask once, and the resulting ``[B, Hp, Lq, Lk]`` tensor is shared by every block."""

    def __init__(self, config: EncDecConfig, *, is_decoder: bool, num_layers: int, init_method: InitMethod,
                 output_init_method: InitMethod, checkpoint_activations: bool = False) -> None:
        super().__init__()
        self.is_decoder, self.checkpoint_activations = is_decoder, checkpoint_activations
        self.blocks = nn.ModuleList(
            Block(config, layer_index=i, is_decoder=is_decoder, init_method=init_method,
                  output_init_method=output_init_method) for i in range(num_layers))
        self.final_layernorm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, h: torch.Tensor, self_mask: Optional[torch.Tensor], *,
                enc_hidden: Optional[torch.Tensor] = None, cross_mask: Optional[torch.Tensor] = None,
                past: Optional[list[LayerCache]] = None, offset: int = 0,
                ) -> tuple[torch.Tensor, Optional[list[LayerCache]]]:
        """
        Args:
            h: embedded input ``[B, Lq, d]``.
            self_mask: additive ``[B or 1, 1, Lq, Lk]`` (Lk = offset + Lq) or None.
            enc_hidden / cross_mask: decoder only: encoder output ``[B, Le, d]`` (None when ``past`` holds the cross
                K/V) and additive ``[B or 1, 1, Lq, Le]`` or None.
            past: decoder only: per-layer caches from the previous step; ``offset`` = their length.
        Returns:
            ``(h [B, Lq, d], caches)``; caches is None for the encoder and under activation checkpointing.
        """
        q_len = h.size(1)
        h = self.dropout(h)
        bias = self.blocks[0].self_attn.self_attn.position_bias(q_len, offset + q_len, offset, h.device)
        self_bias = (bias if self_mask is None else bias + self_mask).to(h.dtype)  # [B|1, Hp, Lq, Lk]
        cross_bias = None if cross_mask is None else cross_mask.to(h.dtype)
        use_checkpoint = self.checkpoint_activations and torch.is_grad_enabled() and past is None
        caches: Optional[list[LayerCache]] = [] if self.is_decoder and not use_checkpoint else None
        for i, block in enumerate(self.blocks):
            if use_checkpoint:
                h = mpu.checkpoint(_block_hidden(block), h, self_bias, enc_hidden, cross_bias)
                continue
            h, cache = block(h, self_bias, enc_hidden, cross_bias, None if past is None else past[i])
            if caches is not None:
                caches.append(cache)
        return self.dropout(self.final_layernorm(h)), caches


def _block_hidden(block: Block):
    """A checkpointable function of tensors only, returning the block's hidden states (no cache)."""
    def run(h, self_bias, enc_hidden, cross_bias):
        return block(h, self_bias, enc_hidden, cross_bias)[0]
    return run
