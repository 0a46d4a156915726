"""Decode-step fast path: a self-attention cache grown in place, and single-query attention through bmm.

Why (profiles of `generate` on CPU, batch 8 x 64 new tokens, recorded in benchmarks/RESULTS.md): with the model's
matmuls on oneDNN (mpu/fast_linear.py), the rest of a decode step was dominated by

- ``torch.cat`` of every layer's self-attention K/V with the new position (a full copy of the cache per step), and
  in beam search by the reorder that copies it again (``index_select``);
- ``scaled_dot_product_attention`` with one query row, whose flash kernel is slower than two bmm calls there.

:class:`GrowableLayerCache` marks a layer cache whose ``self_k`` / ``self_v`` are views ``[N, Hp, L, dk]`` of
buffers ``[N, Hp, capacity, dk]``: the model writes the new position into the buffer (:func:`append_kv`) instead of
concatenating, and returns a view one position longer. Only caches made by :func:`make_growable` are treated so;
a plain cache (a list of dicts, e.g. from ``EncDecModel.reorder_cache`` or a user slicing a full-forward cache)
still goes through ``torch.cat`` and is never written to.

Contract of a growable cache: each call consumes it. Feeding the same growable cache twice (branching) would make
the second call overwrite the position the first one wrote; `CachedDecoder` never does that.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class GrowableLayerCache(dict):
    """A layer cache ``{"self_k", "self_v", "cross_k", "cross_v"}`` whose self K/V have spare capacity."""


def _capacity(x: torch.Tensor) -> int:
    """Positions the buffer behind the view ``x [N, Hp, L, dk]`` holds (see :func:`make_growable`)."""
    return x.stride(1) // x.size(3)


def make_growable(past: list[dict], capacity: int) -> list[GrowableLayerCache]:
    """Copy each layer's self K/V ``[N, Hp, L, dk]`` into buffers of ``capacity`` positions; cross K/V are made
    contiguous once (the single-query attention then views them as ``[N*Hp, Le, dk]`` without a copy)."""
    out = []
    for layer in past:
        grown = GrowableLayerCache(layer)
        for name in ("self_k", "self_v"):
            x = layer[name]
            n, heads, length, dk = x.shape
            buffer = x.new_empty(n, heads, max(capacity, length), dk)
            buffer[:, :, :length] = x
            grown[name] = buffer[:, :, :length]
        for name in ("cross_k", "cross_v"):
            grown[name] = layer[name].contiguous()
        out.append(grown)
    return out


def append_kv(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``torch.cat([past, new], dim=2)`` for a view of a growable buffer: writes ``new`` ``[N, Hp, Lq, dk]`` into
    the buffer after ``past`` and returns the longer view. Falls back to ``cat`` when the buffer is full."""
    n, heads, length, dk = past.shape
    q_len = new.size(2)
    if length + q_len > _capacity(past):
        return torch.cat([past, new], dim=2)
    grown = past.as_strided((n, heads, length + q_len, dk), past.stride(), past.storage_offset())
    grown[:, :, length:] = new
    return grown


def reorder_growable(past: list[GrowableLayerCache], rows: torch.Tensor,
                     spare: Optional[list[dict[str, torch.Tensor]]]) -> tuple[list[GrowableLayerCache], list]:
    """Beam reorder: row i of every self K/V becomes old row ``rows[i]``, copied (the filled positions of each
    (row, head) are one contiguous run) into a second set of buffers that is reused every step (no allocation).
    Returns ``(new cache, the buffers to reuse next time)``. Cross K/V are shared by an example's beams: untouched.
    """
    out, freed = [], []
    heads_index = None
    for i, layer in enumerate(past):
        grown, old = GrowableLayerCache(layer), {}
        for name in ("self_k", "self_v"):
            x = layer[name]
            n, heads, length, dk = x.shape
            capacity = _capacity(x)
            base = x.as_strided((n, heads, capacity, dk), (heads * capacity * dk, capacity * dk, dk, 1),
                                x.storage_offset())
            target = spare[i][name] if spare is not None else None
            if target is None or target.shape != (rows.numel(), heads, capacity, dk):
                target = x.new_empty(rows.numel(), heads, capacity, dk)
            if heads_index is None:  # (row, head) pairs of the new order: one contiguous run of positions each
                heads_index = (rows[:, None] * heads + torch.arange(heads, device=rows.device)).flatten()
            # Copy the filled positions only (not the spare capacity): [rows*heads, length*dk] strided views.
            torch.index_select(base.view(n * heads, capacity * dk)[:, :length * dk], 0, heads_index,
                               out=target.view(rows.numel() * heads, capacity * dk)[:, :length * dk])
            grown[name] = target[:, :, :length]
            old[name] = base if base.is_contiguous() else None
        out.append(grown)
        freed.append(old)
    return out, freed


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Unscaled softmax attention for one query row: ``q [B, Hp, 1, dk]``, ``k, v [B, Hp, Lk, dk]``, additive
    ``attn_bias`` broadcastable to ``[B, Hp, 1, Lk]`` -> ``[B, Hp, 1, dk]``. Two bmm calls on ``[B*Hp, ...]`` views
    (no copy for contiguous or growable K/V); the same maths as ``scaled_dot_product_attention(scale=1.0)``.
    K/V with fewer rows ``[B/g, ...]`` are shared by g consecutive query rows (beams of one example)."""
    b, heads, _, dk = q.shape
    k_len = k.size(2)
    if k.size(0) != b:
        return _grouped_single_query_attention(q, k, v, attn_bias)
    scores = torch.bmm(q.reshape(b * heads, 1, dk), k.reshape(b * heads, k_len, dk).transpose(1, 2))
    scores = scores.view(b, heads, 1, k_len)  # [B, Hp, 1, Lk]
    if attn_bias is not None:
        scores = scores + attn_bias
    probs = F.softmax(scores, dim=-1).view(b * heads, 1, k_len)
    return torch.bmm(probs, v.reshape(b * heads, k_len, dk)).view(b, heads, 1, dk)


def _grouped_single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Beam search's cross-attention: rows ``e*g .. e*g+g-1`` of ``q [B, Hp, 1, dk]`` (the g beams of example e)
    attend to row e of ``k, v [B/g, Hp, Le, dk]``. The beams become the M dimension of one bmm per (example, head),
    so the cross K/V are read once per example instead of once per beam (they are never copied per beam)."""
    b, heads, _, dk = q.shape
    examples, k_len = k.size(0), k.size(2)
    if b % examples:
        raise ValueError(f"{b} query rows cannot share K/V of {examples} rows")
    g = b // examples
    qg = q.reshape(examples, g, heads, dk).transpose(1, 2).reshape(examples * heads, g, dk)
    scores = torch.bmm(qg, k.reshape(examples * heads, k_len, dk).transpose(1, 2)).view(examples, heads, g, k_len)
    if attn_bias is not None:
        if attn_bias.size(0) == b:  # per-row bias [B, h, 1, Lk] -> [B/g, h, g, Lk]
            attn_bias = attn_bias.reshape(examples, g, attn_bias.size(1), k_len).transpose(1, 2)
        scores = scores + attn_bias
    probs = F.softmax(scores, dim=-1).view(examples * heads, g, k_len)
    context = torch.bmm(probs, v.reshape(examples * heads, k_len, dk))  # [B/g * Hp, g, dk]
    return context.view(examples, heads, g, dk).transpose(1, 2).reshape(b, heads, 1, dk)
