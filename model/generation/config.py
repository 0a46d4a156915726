"""`GenerationConfig`: the decoding settings of one `generate` call, checked once when built."""
from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass
from typing import Sequence


@dataclass(frozen=True)
class GenerationConfig:
    """How `model.generation.generate` decodes. Lengths count new tokens (after `decoder_prefix`).

    Sampling and beam search are exclusive (`do_sample=True` needs `num_beams=1`). With `do_sample=False`
    the sampling knobs (`top_k`, `top_p`, `temperature`) are ignored (logged once per call).
    """

    max_length: int
    """Most new tokens per row, the eos token included (the original's `--out-seq-length`)."""
    _: KW_ONLY
    eos_id: int
    """Stop token; `<s_1>` for CPM-2 generation tasks (SPEC §6), `</s>` for HF-style T5."""
    pad_id: int
    """Fills each row after its eos (and beam hypotheses shorter than the longest)."""
    decoder_prefix: Sequence[int]
    """Decoder tokens fed before the first new token: `[<s>, <s_0>]` for CPM-2 tasks, `[pad]` for HF T5.
    Stored as a tuple."""
    min_length: int = 0
    """eos is forbidden until this many new tokens exist (HF `min_new_tokens`)."""
    do_sample: bool = False
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = no top-k cut."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose cumulative probability before them is < top_p."""
    temperature: float = 1.0
    """Divides the logits before top-k / top-p / softmax (sampling only)."""
    num_beams: int = 1
    """> 1 selects beam search (beams run as batch rows)."""
    length_penalty: float = 1.0
    """Beam hypotheses are ranked by sum(log p) / length**length_penalty, length = new tokens incl. eos (HF)."""
    no_repeat_ngram_size: int = 0
    """Forbid any n-gram of this size to occur twice in the decoder sequence (prefix included, as HF); 0 = off."""

    def __post_init__(self) -> None:
        _check_int("max_length", self.max_length, 1, "generate at least one token")
        _check_int("min_length", self.min_length, 0, "use 0 to allow eos at once")
        if self.min_length > self.max_length:
            raise ValueError(
                f"GenerationConfig: min_length={self.min_length} exceeds max_length={self.max_length}; "
                "eos could never be produced. Lower min_length or raise max_length"
            )
        _check_int("eos_id", self.eos_id, 0, "pass the tokenizer's id of the stop token (<s_1> for CPM-2)")
        _check_int("pad_id", self.pad_id, 0, "pass the tokenizer's pad_id")
        prefix = tuple(self.decoder_prefix) if self.decoder_prefix is not None else ()
        if not prefix or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in prefix):
            raise ValueError(
                f"GenerationConfig: decoder_prefix={self.decoder_prefix!r} must be a non-empty list of token ids "
                ">= 0, e.g. [<s>, <s_0>] for CPM-2 or [pad_id] for HF T5"
            )
        object.__setattr__(self, "decoder_prefix", prefix)
        _check_int("top_k", self.top_k, 0, "use 0 to turn top-k off")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"GenerationConfig: top_p={self.top_p} must be in (0, 1]; use 1.0 to turn top-p off")
        if not float(self.temperature) > 0.0:
            raise ValueError(
                f"GenerationConfig: temperature={self.temperature} must be > 0; for greedy use do_sample=False"
            )
        _check_int("num_beams", self.num_beams, 1, "use 1 for greedy or sampling")
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, "use 0 to turn it off")
        if self.do_sample and self.num_beams > 1:
            raise ValueError(
                f"GenerationConfig: do_sample=True with num_beams={self.num_beams} (beam sampling) is not supported; "
                "use num_beams=1 to sample or do_sample=False for beam search"
            )

    def replace(self, **changes) -> "GenerationConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_int(name: str, value, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"GenerationConfig: {name}={value!r} must be an integer >= {minimum}; {hint}")
