"""EncDecConfig: the original CPM-2 model JSON keys (reference/original-toolkit.md §2.1)."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Optional

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EncDecConfig:
    """Sizes and numerics of a T5 v1.1-style encoder-decoder. Defaults are T5-base-like; the 11B CPM-2 values are
    in ``configs/model/cpm2_config.json``."""

    d_model: int = 768  # hidden size of the residual stream
    d_ff: int = 2048  # inner size of the gated-GeLU feed-forward (per gate)
    d_kv: int = 64  # size of one attention head; inner attention size is num_heads * d_kv
    num_heads: int = 12
    num_layers: int = 12  # encoder blocks (and decoder blocks unless num_decoder_layers is set)
    num_decoder_layers: Optional[int] = None  # decoder blocks; None = num_layers (the original ignored this key)
    dropout_rate: float = 0.0  # embeddings, attention probs, FF hidden, residual branches, final norm output
    layer_norm_epsilon: float = 1e-6  # RMSNorm eps
    init_method_std: float = 0.001  # N(0, std) for new weights; CPM-2 used 0.001
    use_scaled_init_for_output_weights: bool = True  # `dense`, `wo`: std / sqrt(2 * num_layers)
    relative_attention_num_buckets: int = 32  # T5 bucketing; absent from the original JSON (class default)
    relative_attention_max_distance: int = 128  # hard-coded in the original
    vocab_size: Optional[int] = None  # set from the tokenizer before building the model
    # Kept for round-tripping the original JSON; not used by the model (original-toolkit.md §2.1):
    feed_forward_proj: str = "relu"  # ignored: the FF is always gated GeLU (tanh)
    initializer_factor: float = 1.0
    max_position_embeddings: int = 512  # no absolute positions
    use_cache: bool = True
    do_dim_trick: bool = False

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        for name in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"config dropout_rate must be in [0, 1), got {self.dropout_rate}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EncDecConfig":
        """Build from a dict; unknown keys are accepted and ignored (logged once)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            logger.info("EncDecConfig: ignoring unknown keys %s", unknown)
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str) -> "EncDecConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_file(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
