"""Text generation and teacher-forced scoring for `EncDecModel` (docs/generation.md).

- `generate`: batched greedy / sampling / beam search with the self-attention KV cache and cross K/V computed once.
- `score_candidates`: restricted argmax over each example's label tokens (classification).
- `score_token_logit`: one token's logit at the last decoder position (ranking).
"""
from .config import GenerationConfig
from .scoring import score_candidates, score_token_logit
from .search import generate

__all__ = ["GenerationConfig", "generate", "score_candidates", "score_token_logit"]
