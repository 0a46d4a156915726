"""Math23K: solve a Chinese math word problem by generating its equation (Wang et al. 2017; original §5.2).

Layouts (detected per file from its first record; JSON list, JSON lines or concatenated objects):
  * CPM-2: ``{"text", "equation"}``;
  * public (Math_23K.json / Graph2Tree ``*23k_processed.json``): ``{"original_text", "equation", "ans", "id"}``.
    Its ``text`` field holds placeholders (temp_a ...), so the public layout always reads ``original_text``.

Encoder: the problem text, untruncated. Target: the equation without its leading ``x=`` (the original's
``equation[2:]``), then <s_1>. The raw example keeps ``equation`` and, when given, ``ans``.
Metric: value accuracy (a safe arithmetic evaluator, tolerance 1e-4, ``N%`` = N/100), not the original's exact
token match. Decoding: greedy.
Prompt tuning: P[0..c0) text P[c0..c1) with c0 = int(r0 n), c1 = int((r0 + r2) n). ratio_list[1] is ignored,
as the original did (its Math/LCSTS/WMT datasets only read r[0] and r[2]); default [1, 0, 0].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from data_utils.errors import DataError
from data_utils.prompt import PromptLayout
from data_utils.tasks.base import (BadLines, DecodingDefaults, GenerateTask, Tokenizer, as_object, get_str,
                                   iter_json_values)

# The original dropped r[1] for these tasks; (0, 2) = the gap before the text uses r[0], the one after uses r[2].
TEXT_ONLY_LAYOUT = PromptLayout(default_ratios=(1.0, 0.0, 0.0), gap_ratios=(0, 2))


class Math23K(GenerateTask):
    name = "math"
    aliases = ("math23k",)
    default_ext = ".json"
    main_metric = "value_accuracy"
    decoding = DecodingDefaults()  # greedy, up to 256 tokens (the original's evaluate_gen)
    prompt_layout = TEXT_ONLY_LAYOUT
    equation_prefix = "x="

    def read_file(self, path: Path, *, split: str, bad: BadLines) -> list[dict]:
        optional = self.labels_optional(split)
        text_field: Optional[str] = None  # decided by the file's first record
        examples: list[dict] = []
        for line, value in iter_json_values(path, bad):
            try:
                obj = as_object(value)
                if text_field is None:
                    text_field = "original_text" if "original_text" in obj else "text"
                examples.append(self._example(obj, text_field, len(examples), optional))
            except DataError as err:
                bad.handle(err, line)
        return examples

    def _example(self, obj: dict, text_field: str, index: int, optional: bool) -> dict:
        equation = get_str(obj, "equation", optional=optional)
        example = {
            "id": obj.get("id", index),
            "text": get_str(obj, text_field),
            "equation": equation,
            "target": self.strip_prefix(equation) if equation is not None else None,
        }
        if "ans" in obj:
            if not isinstance(obj["ans"], (str, int, float)) or isinstance(obj["ans"], bool):
                raise DataError(f"must be a number or a string, got {obj['ans']!r}", field="ans")
            example["ans"] = obj["ans"]
        return example

    def strip_prefix(self, equation: str) -> str:
        equation = equation.strip()
        return equation[len(self.equation_prefix):] if equation.lower().startswith(self.equation_prefix) else equation

    def encode(self, raw: dict, tokenizer: Tokenizer, *, prompt: Any = None,
               max_enc_len: Optional[int] = None) -> dict:
        return self.encode_text_to_target(raw, tokenizer, text=raw["text"], target=raw["target"],
                                          prompt=prompt, max_enc_len=max_enc_len)

    def compute_metrics(self, records: Sequence[Mapping]) -> dict[str, float]:
        from data_utils.metrics import math_value_accuracy

        preds, refs = self.texts(records)
        if not refs:
            return {"num_scored": 0.0}
        return {"value_accuracy": float(math_value_accuracy(preds, refs)), "num_scored": float(len(refs))}
