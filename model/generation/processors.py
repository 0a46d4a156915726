"""Per-step score processing and token choice for `generate`: pure tensor functions, batched over rows.

All functions take scores `[N, V]` in fp32 over the full vocabulary (N = rows: examples, or examples x beams).
They never loop over rows in Python and never synchronise with the host.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import GenerationConfig


def forbid_token(scores: torch.Tensor, token_id: int) -> None:
    """Set `scores[:, token_id] = -inf` in place (min_length: no eos yet)."""
    scores[:, token_id] = float("-inf")


def ban_repeated_ngrams(scores: torch.Tensor, seqs: torch.Tensor, n: int) -> None:
    """Forbid, in place, every token that would complete an n-gram already present in its row.

    scores: [N, V] float; seqs: [N, L] long, the decoder sequence so far (prefix included, as HF's
    `NoRepeatNGramLogitsProcessor`). For each row, if the last n-1 tokens equal the first n-1 tokens of an
    earlier n-gram, that n-gram's last token gets -inf. Vectorised over rows and positions.
    """
    length = seqs.size(1)
    if n <= 0 or length < n:
        return
    windows = seqs.unfold(1, n, 1)  # [N, L-n+1, n]: every n-gram of each row
    if n > 1:
        query = seqs[:, length - n + 1:]  # [N, n-1]: the tokens the next one would extend
        hit = (windows[:, :, :-1] == query[:, None, :]).all(dim=-1)  # [N, L-n+1]
    else:
        hit = torch.ones(windows.shape[:2], dtype=torch.bool, device=seqs.device)
    banned = windows[:, :, -1]  # [N, L-n+1]: the token that completes each n-gram
    # A token may complete several n-grams, some matching and some not: reduce with min so that one match wins
    # (a plain scatter_ with duplicate indices would keep an arbitrary one).
    fill = torch.full(banned.shape, float("inf"), dtype=scores.dtype, device=scores.device)
    fill.masked_fill_(hit, float("-inf"))
    scores.scatter_reduce_(1, banned, fill, reduce="amin")


def apply_constraints(scores: torch.Tensor, seqs: torch.Tensor, step: int, config: GenerationConfig) -> None:
    """min_length and no-repeat n-gram, in place. `step` = number of new tokens already generated."""
    if step < config.min_length:
        forbid_token(scores, config.eos_id)
    if config.no_repeat_ngram_size > 0:
        ban_repeated_ngrams(scores, seqs, config.no_repeat_ngram_size)


def _keep_nucleus(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Given logits sorted in descending order [N, k], set to -inf every token whose preceding cumulative
    probability is already >= top_p (the most likely token is always kept). Same rule as HF's TopPLogitsWarper
    (which removes, in ascending order, tokens with cumulative probability <= 1 - top_p)."""
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # [N, k]: probability mass of the more likely tokens
    return sorted_logits.masked_fill(before >= top_p, float("-inf"))


def sample_tokens(
    scores: torch.Tensor, config: GenerationConfig, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Draw one token per row [N] from scores [N, V] (fp32) with temperature, top-k and top-p.

    With top_k > 0 only the k best logits are sorted and sampled from (no full-vocab sort); top_p alone sorts the
    full row once. The draw is `torch.multinomial(..., generator=generator)`: reproducible for a fixed seed, and the
    same on every model-parallel rank when each rank's generator has the same seed (the scores are identical there).
    """
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k > 0 or config.top_p < 1.0:
        if config.top_k > 0:
            values, indices = scores.topk(min(config.top_k, scores.size(-1)), dim=-1)  # [N, k], descending
        else:
            values, indices = scores.sort(dim=-1, descending=True)  # [N, V]
        if config.top_p < 1.0:
            values = _keep_nucleus(values, config.top_p)
        choice = torch.multinomial(values.softmax(dim=-1), 1, generator=generator)  # [N, 1] index into values
        return indices.gather(1, choice).squeeze(1)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
