"""LCQMC: do two questions mean the same? (Liu et al. 2018; ``reference/original-toolkit.md`` §5.2)

Layouts (detected per file from its first character):
  * CPM-2: JSON lines ``{"sentence1", "sentence2", "label": 0|1, "id"?}``;
  * public: TSV ``text_a<TAB>text_b<TAB>label``, with or without a header row (``text_a text_b label``,
    PaddleNLP's ``query title label``); an unlabelled test file may have two columns.

Encoder (full fine-tuning): “s1”与“s2”的意思<s_0>, the original's ids 39, s1, 41, 62, 39, s2, 41, 11, 1348, 26050,
here looked up by string. Target: 矛盾 (label 0) or 相似 (label 1).
Prompt tuning drops every template word: P[0..c0) s1 (；) P[c0..c1) s2 P[c1..n), default ratios [0.5, 0.5, 0].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from data_utils.errors import DataError
from data_utils.prompt import PromptLayout, as_prompt_config
from data_utils.tasks.base import (BadLines, ClassifyTask, Tokenizer, as_object, encoded, first_non_space_char,
                                   get_label, get_str, iter_json_values, iter_tsv_rows, single_token_id)

# Header names seen in public TSV copies, mapped to our field names.
_TSV_HEADER_NAMES = {"text_a": "sentence1", "sentence1": "sentence1", "query": "sentence1",
                     "text_b": "sentence2", "sentence2": "sentence2", "title": "sentence2", "label": "label"}


class LCQMC(ClassifyTask):
    name = "lcqmc"
    default_ext = ".jsonl"
    alt_exts = (".tsv", ".txt")
    labels = (0, 1)
    label_words = ("矛盾", "相似")  # the original's verbalizer: 0 -> 矛盾 (contradiction), 1 -> 相似 (similar)
    # “s1”与“s2”的意思<s_0>: each template word is one vocab token (the original's ids 39 / 41 / 62 / 11 / 1348)
    open_quote, close_quote, joiner, particle, meaning = "“", "”", "与", "的", "意思"
    prompt_separator = "；"  # inserted between the sentences when ratio_list[1] == 0 (the original's id 18)
    prompt_layout = PromptLayout(default_ratios=(0.5, 0.5, 0.0), gap_ratios=(0, 1))

    # ---- reading -------------------------------------------------------------------------------------------

    def read_file(self, path: Path, *, split: str, bad: BadLines) -> list[dict]:
        optional = self.labels_optional(split)
        if first_non_space_char(path) == "{":
            rows = ((line, self._from_json(value, optional)) for line, value in iter_json_values(path, bad))
        else:
            rows = self._tsv_rows(path, bad, optional)
        examples: list[dict] = []
        for line, parsed in rows:
            if isinstance(parsed, DataError):
                bad.handle(parsed, line)
                continue
            parsed.setdefault("id", len(examples))
            examples.append(parsed)
        return examples

    def _from_json(self, value: Any, optional: bool) -> Any:
        try:
            obj = as_object(value)
            example = {
                "sentence1": get_str(obj, "sentence1"),
                "sentence2": get_str(obj, "sentence2"),
                "label": get_label(obj, "label", self.labels, optional=optional),
            }
        except DataError as err:
            return err
        if "id" in obj:
            example["id"] = obj["id"]
        return example

    def _tsv_rows(self, path: Path, bad: BadLines, optional: bool):
        columns = ["sentence1", "sentence2", "label"]
        for number, (line, cells) in enumerate(iter_tsv_rows(path, bad)):
            names = [c.strip().lower() for c in cells]
            if number == 0 and "label" in names and all(n in _TSV_HEADER_NAMES for n in names):
                columns = [_TSV_HEADER_NAMES[n] for n in names]
                continue
            if len(cells) != len(columns) and not (optional and len(cells) == 2 and columns[-1] == "label"):
                yield line, DataError(f"expected {len(columns)} tab-separated columns ({', '.join(columns)}), "
                                      f"got {len(cells)}")
                continue
            row = dict(zip(columns, cells))
            try:
                yield line, {
                    "sentence1": row["sentence1"],
                    "sentence2": row["sentence2"],
                    "label": get_label(row, "label", self.labels, optional=optional),
                }
            except DataError as err:
                yield line, err

    # ---- encoding ------------------------------------------------------------------------------------------

    def encode(self, raw: dict, tokenizer: Tokenizer, *, prompt: Any = None,
               max_enc_len: Optional[int] = None) -> dict:
        config = as_prompt_config(prompt)
        word = {w: single_token_id(tokenizer, w, role="LCQMC template word")
                for w in (self.open_quote, self.close_quote, self.joiner, self.particle, self.meaning)}
        candidates = [single_token_id(tokenizer, w, role="LCQMC label word") for w in self.label_words]
        s1, s2 = tokenizer.encode(raw["sentence1"]), tokenizer.encode(raw["sentence2"])
        if config is None:
            q1, q2 = word[self.open_quote], word[self.close_quote]
            enc_ids = ([q1] + s1 + [q2, word[self.joiner], q1] + s2
                       + [q2, word[self.particle], word[self.meaning], tokenizer.get_sentinel_id(0)])
            enc_ids = enc_ids[:max_enc_len] if max_enc_len else enc_ids
        else:
            sep = single_token_id(tokenizer, self.prompt_separator, role="prompt separator")
            enc_ids = self.prompt_layout.build([s1, s2], config, sep_id=sep, max_len=max_enc_len)
        label: Optional[int] = raw["label"]
        return encoded(
            raw=raw,
            enc_ids=enc_ids,
            answer_ids=[candidates[label]] if label is not None else [],
            candidate_ids=candidates,
            label_index=label if label is not None else -1,
            input_text=f"“{raw['sentence1']}”与“{raw['sentence2']}”的意思",
            reference=self.label_words[label] if label is not None else None,
        )
