"""Batched beam search with beams as rows (B*K), following HF transformers' vectorised beam search
(`GenerationMixin._beam_search`, v4.57) with `early_stopping=True`.

Per example and step: the 2K best continuations of all K beams (by accumulated log-probability) are ranked. A
continuation ending in eos counts as a finished hypothesis only when it is among the first K (HF's rule), scored
sum(log p) / new_len**length_penalty with new_len counting eos; the K best finished hypotheses per example are kept.
The K best continuations not ending in eos become the next beams. An example is done when it holds K finished
hypotheses; the loop ends when every example is done, or at max_length, where the first K continuations of each
unfinished example all count as finished. The result is the best finished hypothesis of each example.
"""
from __future__ import annotations

import torch

from .cached_decoder import CachedDecoder
from .config import GenerationConfig
from .processors import apply_constraints

# Large negative score for empty slots and removed candidates, as HF (-inf would turn into NaN in sums).
_NEG = -1.0e9


def beam_search(decoder: CachedDecoder, config: GenerationConfig) -> torch.Tensor:
    """Run beam search on a fresh `CachedDecoder`; returns [B, T] long (best hypothesis per example, eos then pad).

    Works for num_beams = 1 too (then equal to greedy). One host sync per step.
    """
    batch, beams, device = decoder.batch_size, config.num_beams, decoder.device
    prefix_len, max_new, rows = len(config.decoder_prefix), config.max_length, decoder.batch_size * config.num_beams
    row_offset = torch.arange(batch, device=device)[:, None] * beams  # [B, 1]: first row of each example

    # Running beams: the whole decoder sequence per row [B*K, P + max_new] and the accumulated log-probability.
    seqs = torch.full((batch, prefix_len + max_new), config.pad_id, dtype=torch.long, device=device)
    seqs[:, :prefix_len] = torch.tensor(config.decoder_prefix, dtype=torch.long, device=device)
    # [B, V]: the prefix runs once per example ...
    scores = decoder.start(seqs[:, :prefix_len], special_ids=(config.eos_id, config.pad_id))
    decoder.expand_rows(beams)  # ... and its cache (cross K/V included) is copied to the K beams once
    seqs = seqs.repeat_interleave(beams, dim=0)  # [B*K, P + max_new]
    scores = scores.repeat_interleave(beams, dim=0)  # [B*K, V]
    vocab = scores.size(-1)
    if 2 * beams > vocab:
        raise ValueError(f"beam search ranks 2 * num_beams = {2 * beams} continuations per example but the vocabulary "
                         f"has only {vocab} tokens; use num_beams <= {vocab // 2}")
    # Only beam 0 is live at first, so the first step does not pick K copies of the same token.
    beam_scores = torch.full((batch, beams), _NEG, dtype=torch.float32, device=device)
    beam_scores[:, 0] = 0.0

    # Finished hypotheses: K slots per example, best first; new tokens only.
    fin_seqs = torch.full((batch, beams, max_new), config.pad_id, dtype=torch.long, device=device)
    fin_scores = torch.full((batch, beams), _NEG, dtype=torch.float32, device=device)
    fin_flags = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    fin_lens = torch.zeros((batch, beams), dtype=torch.long, device=device)

    step = 0
    while True:
        # HF applies length constraints to the log-probabilities (no renormalisation after banning).
        log_probs = torch.log_softmax(scores, dim=-1)  # [B*K, V]
        apply_constraints(log_probs, seqs[:, : prefix_len + step], step, config)
        total = (log_probs + beam_scores.view(rows, 1)).view(batch, beams * vocab)
        top_scores, top_index = total.topk(2 * beams, dim=1)  # [B, 2K], best first
        top_beam = top_index // vocab  # [B, 2K] beam within the example
        top_token = top_index % vocab  # [B, 2K]
        last_step = step + 1 == max_new
        stops = torch.ones_like(top_token, dtype=torch.bool) if last_step else top_token == config.eos_id

        # Finished hypotheses: stopped continuations among the first K, for examples not yet done.
        done = fin_flags.all(dim=1, keepdim=True)  # [B, 1]
        new_flags = stops[:, :beams] & ~done  # [B, K]
        new_scores = top_scores[:, :beams] / float(step + 1) ** config.length_penalty
        new_scores = torch.where(new_flags, new_scores, torch.full_like(new_scores, _NEG))
        new_seqs = seqs.view(batch, beams, -1)[:, :, prefix_len:].gather(
            1, top_beam[:, :beams, None].expand(batch, beams, max_new)
        )  # [B, K, max_new]
        new_seqs[:, :, step] = top_token[:, :beams]
        keep = torch.cat((fin_scores, new_scores), dim=1).topk(beams, dim=1).indices  # [B, K] of 2K
        fin_scores = torch.cat((fin_scores, new_scores), dim=1).gather(1, keep)
        fin_flags = torch.cat((fin_flags, new_flags), dim=1).gather(1, keep)
        fin_lens = torch.cat((fin_lens, torch.full_like(fin_lens, step + 1)), dim=1).gather(1, keep)
        fin_seqs = torch.cat((fin_seqs, new_seqs), dim=1).gather(1, keep[:, :, None].expand(batch, beams, max_new))

        step += 1
        if last_step or bool(fin_flags.all()):  # the one host sync per step
            break

        # Next beams: the K best continuations that did not stop.
        running = top_scores.masked_fill(stops, _NEG)  # HF adds -1e9; masking keeps the ranking the same
        next_pos = running.topk(beams, dim=1).indices  # [B, K] of 2K
        beam_scores = running.gather(1, next_pos)
        source_rows = (top_beam.gather(1, next_pos) + row_offset).view(rows)  # [B*K] row each beam continues
        next_tokens = top_token.gather(1, next_pos).view(rows)  # [B*K]
        seqs = seqs.index_select(0, source_rows)
        seqs[:, prefix_len + step - 1] = next_tokens
        decoder.reorder_rows(source_rows)
        scores = decoder.step(next_tokens)

    # Crop to the longest best hypothesis (one sync).
    best_len = int(fin_lens[:, 0].max())
    return fin_seqs[:, 0, :best_len].clone()
