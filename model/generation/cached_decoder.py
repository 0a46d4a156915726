"""Incremental decoding on `EncDecModel`'s cache (docs/design.md, "Incremental decoding").

The encoder runs once. The first decoder call feeds the whole decoder prefix with `past_key_values=None`; the model
computes the cross-attention K/V from `enc_hidden_states` there and returns them inside the cache, so later calls
(one new token per row) reuse them and never touch the encoder output again. Logits come back for the last position
only, gathered to the full vocabulary when the model is model-parallel with vocab-parallel output.
"""
from __future__ import annotations

from typing import Optional

import torch

import mpu
from model import decode_step
from model.fast_inference import GrowableLayerCache, make_growable, reorder_growable


def full_vocab_logits(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Logits [N, V/mp] -> [N, V] fp32: all-gather the vocab shards over the model-parallel group.

    Needed when MP > 1 and the model keeps vocab-parallel output (`parallel_output=True`, the default); after the
    gather every MP rank holds the same row and so makes the same choice.
    """
    if getattr(model, "parallel_output", True) and mpu.get_model_parallel_world_size() > 1:
        logits = mpu.gather_from_model_parallel_region(logits.contiguous())
    return logits.float()


class CachedDecoder:
    """Holds the encoder output, the cross mask and the decoder cache of one `generate` call.

    Rows: `batch_size` examples, or examples x beams after `expand_rows`. Counts decoder calls in `num_calls`
    (tests check that the loop stops early).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        enc_input_ids: torch.Tensor,
        enc_attention_mask: Optional[torch.Tensor],
        cross_attention_mask: Optional[torch.Tensor],
        capacity: Optional[int] = None,
    ) -> None:
        self.model = model
        self.enc_input_ids = enc_input_ids  # [B, Le]
        self.cross_attention_mask = cross_attention_mask  # [B, Le] (1 = real token) or None
        out = model(enc_input_ids=enc_input_ids, enc_attention_mask=enc_attention_mask, only_encoder=True)
        self.enc_hidden_states = out["encoder_last_hidden_state"]  # [B, Le, d]
        self.batch_size, self.device = enc_input_ids.size(0), enc_input_ids.device
        self.past: Optional[list] = None
        self.num_calls = 0
        # Decoder positions the self-attention cache will reach (prefix + new tokens): with it, step() grows the
        # cache in place in preallocated buffers (model/fast_inference.py) instead of concatenating every step.
        self.capacity = capacity
        self._spare: Optional[list] = None  # beam search: the second set of cache buffers reorder_rows copies into
        self._cross_bias: Optional[torch.Tensor] = None  # decode steps' additive cross-attention bias, built once
        self._plan: Optional[decode_step.StepPlan] = None  # decode steps' weights, bound once per generate call

    def _decode(self, dec_input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            enc_input_ids=self.enc_input_ids,
            dec_input_ids=dec_input_ids,
            cross_attention_mask=self.cross_attention_mask,
            past_key_values=self.past,
            enc_hidden_states=self.enc_hidden_states,
        )
        if out["past_key_values"] is None:
            raise RuntimeError("the model returned no past_key_values; generation needs the incremental cache "
                               "(is activation checkpointing active with gradients enabled?)")
        if self.past is None:
            # The cache now holds the cross K/V: later calls need neither the encoder ids nor its output
            # (and beam search then never copies them per beam).
            self.enc_input_ids = self.enc_hidden_states = None
        self.past = out["past_key_values"]
        self.num_calls += 1
        return full_vocab_logits(self.model, out["lm_logits"][:, -1, :])

    def start(self, prefix_ids: torch.Tensor, *, special_ids: tuple[int, ...] = ()) -> torch.Tensor:
        """Feed the decoder prefix [N, P] in one call (this computes the cross K/V). Returns logits [N, V] fp32.

        `special_ids` (eos, pad) are checked against the vocabulary size once the logits show it."""
        if self.past is not None:
            raise RuntimeError("CachedDecoder.start called twice; build a new CachedDecoder per generate call")
        logits = self._decode(prefix_ids)
        too_big = [i for i in special_ids if i >= logits.size(-1)]
        if too_big:
            raise ValueError(f"generate: token ids {too_big} (eos_id / pad_id) are outside the model's vocabulary of "
                             f"{logits.size(-1)}; take them from the tokenizer the model was trained with")
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row [N]; returns the next logits [N, V] fp32."""
        if self.capacity is not None and not isinstance(self.past[0], GrowableLayerCache):
            self.past = make_growable(self.past, self.capacity)  # once, after start() (and expand_rows)
        if not decode_step.supports(self.model, self.past):
            return self._decode(tokens[:, None])
        # The same maths as the model's forward for one token, without the module tree (model/decode_step.py).
        if self._cross_bias is None and self.cross_attention_mask is not None:
            cross_k = self.past[0]["cross_k"]
            self._cross_bias = decode_step.cross_bias_for_steps(
                self.cross_attention_mask, cross_k.size(2), cross_k.dtype, cross_k.device)
        if self._plan is None:
            self._plan = decode_step.StepPlan(self.model, tokens.numel())
        hidden, self.past = decode_step.decode_step(self.model, tokens, self.past, self._cross_bias, self._plan)
        self.num_calls += 1
        return full_vocab_logits(self.model, self.model.logits(hidden)[:, -1, :])

    def expand_rows(self, k: int) -> None:
        """Repeat every example k times (row b -> rows b*k .. b*k+k-1), cache included (beam search).

        Done once after the prefix call, so the prefix and the cross K/V are computed for B rows only; the self
        K/V are copied per beam, the cross K/V are shared (never copied); `reorder_rows` moves only the self K/V.
        """
        def rep(x):
            return None if x is None else x.repeat_interleave(k, dim=0)

        if self.past is None:
            raise RuntimeError("CachedDecoder.expand_rows needs the cache: call start() first")
        self.batch_size *= k
        self.cross_attention_mask = rep(self.cross_attention_mask)
        self._cross_bias = None
        # Cross K/V stay one row per example: the model's single-query attention lets the k beams of an example
        # share them (model/fast_inference.py), which saves copying them k times and reading them k times per step.
        self.past = [{name: t if name.startswith("cross") else rep(t) for name, t in layer.items()}
                     for layer in self.past]

    def reorder_rows(self, rows: torch.Tensor) -> None:
        """Row i of the self-attention cache becomes old row `rows[i]` [N] (beam search).

        The cross K/V are not touched: beams only move within their example, whose rows share one cross K/V.
        """
        if isinstance(self.past[0], GrowableLayerCache):
            self.past, self._spare = reorder_growable(self.past, rows, self._spare)
            return
        self.past = [
            {**layer, "self_k": _select_rows(layer["self_k"], rows), "self_v": _select_rows(layer["self_v"], rows)}
            for layer in self.past
        ]


def _select_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`x.index_select(0, rows)`; on a contiguous tensor through a 2-D view [N, rest], which copies whole rows
    (about 4x faster on CPU than the 4-D [N, H, L, dk] kernel)."""
    if not x.is_contiguous():
        return x.index_select(0, rows)
    return x.view(x.size(0), -1).index_select(0, rows).view(rows.numel(), *x.shape[1:])
