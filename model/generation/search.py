"""`generate`: batched greedy, sampling and beam-search decoding with the KV cache (docs/generation.md)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

import mpu
from mpu import fast_linear

from .beam_search import beam_search
from .cached_decoder import CachedDecoder
from .config import GenerationConfig
from .processors import apply_constraints, sample_tokens

logger = logging.getLogger(__name__)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    enc_input_ids: torch.Tensor,
    enc_attention_mask: Optional[torch.Tensor],
    config: GenerationConfig,
    *,
    generator: Optional[torch.Generator] = None,
    cross_attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode new tokens for each example after `config.decoder_prefix`.

    Args:
        model: an `EncDecModel` (put it in eval mode first: dropout is not switched off here).
        enc_input_ids: [B, Le] long (negative ids = soft-prompt positions).
        enc_attention_mask: [B, Le] (1 = real token, 0 = pad), [B, 1, Le, Le], or None (all visible).
        config: decoding settings.
        generator: RNG for sampling (`do_sample=True`); give every model-parallel rank of a group the same seed.
        cross_attention_mask: [B, Le] keys the decoder may attend to; defaults to a 2-D `enc_attention_mask`
            (required when that mask is 4-D).

    Returns:
        LongTensor [B, T], T <= config.max_length: the new tokens. Each row ends with `eos_id` followed by
        `pad_id`, or is cut at `max_length`. T is the longest row.
    """
    if enc_input_ids.dim() != 2:
        raise ValueError(f"generate: enc_input_ids must be [B, Le], got shape {tuple(enc_input_ids.shape)}")
    if cross_attention_mask is None and enc_attention_mask is not None:
        if enc_attention_mask.dim() != 2:
            raise ValueError(
                f"generate: enc_attention_mask has shape {tuple(enc_attention_mask.shape)}; with a 4-D encoder mask "
                "pass cross_attention_mask=[B, Le] (1 = real encoder token) as well"
            )
        cross_attention_mask = enc_attention_mask
    if cross_attention_mask is not None and tuple(cross_attention_mask.shape) != tuple(enc_input_ids.shape):
        raise ValueError(
            f"generate: cross_attention_mask shape {tuple(cross_attention_mask.shape)} must equal enc_input_ids "
            f"shape {tuple(enc_input_ids.shape)}"
        )
    if not config.do_sample and (config.top_k > 0 or config.top_p < 1.0 or config.temperature != 1.0):
        logger.warning(
            "generate: do_sample=False, so top_k=%s, top_p=%s, temperature=%s are ignored",
            config.top_k, config.top_p, config.temperature,
        )
    if config.do_sample and generator is None and mpu.get_model_parallel_world_size() > 1:
        raise ValueError(
            f"generate: sampling at model-parallel size {mpu.get_model_parallel_world_size()} needs "
            "generator=torch.Generator().manual_seed(seed) with the same seed on every rank of the MP group "
            "(otherwise the ranks could draw different tokens)"
        )
    # Weights cannot change during one generate call: pack them for oneDNN once (mpu.fast_linear).
    with fast_linear.packed_weights():
        decoder = CachedDecoder(model, enc_input_ids, enc_attention_mask, cross_attention_mask,
                                capacity=len(config.decoder_prefix) + config.max_length)
        if config.num_beams > 1:
            return beam_search(decoder, config)
        return greedy_or_sample(decoder, config, generator)


def greedy_or_sample(
    decoder: CachedDecoder, config: GenerationConfig, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One row per example: argmax (or a draw) per step; finished rows are fed pad until every row has stopped.

    One host sync per step (`finished.all()`), none when a row stops. Returns [B, T] long.
    """
    batch, prefix_len, max_new = decoder.batch_size, len(config.decoder_prefix), config.max_length
    # seqs holds the whole decoder sequence (the no-repeat n-gram check reads it); preallocated once.
    seqs = torch.full((batch, prefix_len + max_new), config.pad_id, dtype=torch.long, device=decoder.device)
    seqs[:, :prefix_len] = torch.tensor(config.decoder_prefix, dtype=torch.long, device=decoder.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=decoder.device)
    pad = torch.tensor(config.pad_id, dtype=torch.long, device=decoder.device)

    scores = decoder.start(seqs[:, :prefix_len], special_ids=(config.eos_id, config.pad_id))  # [B, V] fp32
    step = 0
    while True:
        apply_constraints(scores, seqs[:, : prefix_len + step], step, config)
        if config.do_sample:
            tokens = sample_tokens(scores, config, generator)
        else:
            tokens = scores.argmax(dim=-1)  # [B]
        tokens = torch.where(finished, pad, tokens)
        seqs[:, prefix_len + step] = tokens
        finished |= tokens == config.eos_id
        step += 1
        if step == max_new or bool(finished.all()):  # the one host sync per step
            break
        scores = decoder.step(tokens)
    return seqs[:, prefix_len: prefix_len + step].clone()
