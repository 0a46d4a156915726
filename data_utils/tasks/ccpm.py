"""CCPM: pick the classical-poem line that matches a modern translation (``reference/original-toolkit.md`` §5.2).

Layout (original and public THUNLP-AIPoet/CCPM, the same): JSON lines
``{"translation": str, "choices": [4 str], "answer": int}``; the public ``valid.jsonl`` is read as dev and
``test_public.jsonl`` (no answers) as the unlabelled test split.

Encoder (full fine-tuning): 选项：一、c1；二、c2；三、c3；四、c4；文章：translation. Target: the answer's numeral.
Prompt tuning drops 选项：/文章：, puts 3 positions before each option (P[0..12) for 4 options), then
P[12..c0) options (；) P[c0..c1) translation P[c1..n); default ratios [0.5, 0.5, 0, 0]; the script's [1, 0, 0] gives
88 positions in front + 12 in the options, and a ； before the translation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from data_utils.errors import DataError
from data_utils.prompt import PromptLayout, as_prompt_config, join_truncating
from data_utils.tasks.base import (OPTION_END, BadLines, ClassifyTask, Tokenizer, as_object, check_option_count,
                                   choice_encoded, get_label, get_str, get_str_list, iter_json_values,
                                   options_ids, options_text, single_token_id)


class CCPM(ClassifyTask):
    name = "ccpm"
    default_ext = ".jsonl"
    options_prefix, passage_prefix = "选项：", "文章："  # encoded as text, as the original did
    prompt_layout = PromptLayout(default_ratios=(0.5, 0.5, 0.0, 0.0), gap_ratios=(0, 1), per_option=3)

    def read_file(self, path: Path, *, split: str, bad: BadLines) -> list[dict]:
        optional = self.labels_optional(split)
        examples: list[dict] = []
        for line, value in iter_json_values(path, bad):
            try:
                obj = as_object(value)
                choices = get_str_list(obj, "choices")
                check_option_count(choices, "choices")
                example = {
                    "id": obj.get("id", len(examples)),
                    "translation": get_str(obj, "translation"),
                    "choices": choices,
                    "label": get_label(obj, "answer", range(len(choices)), optional=optional),
                }
            except DataError as err:
                bad.handle(err, line)
                continue
            examples.append(example)
        return examples

    def encode(self, raw: dict, tokenizer: Tokenizer, *, prompt: Any = None,
               max_enc_len: Optional[int] = None) -> dict:
        config = as_prompt_config(prompt)
        max_len = max_enc_len or self.max_enc_len
        translation = tokenizer.encode(raw["translation"])
        per_option = self.prompt_layout.per_option if config is not None else 0
        options, numerals = options_ids(tokenizer, raw["choices"], prompts_before_each=per_option)
        if config is None:
            enc_ids = join_truncating([tokenizer.encode(self.options_prefix), options,
                                       tokenizer.encode(self.passage_prefix), translation], 3, max_len)
        else:
            sep = single_token_id(tokenizer, OPTION_END, role="prompt separator")
            enc_ids = self.prompt_layout.build([options, translation], config, sep_id=sep,
                                               num_options=len(raw["choices"]), body=1, max_len=max_len)
        return choice_encoded(raw=raw, enc_ids=enc_ids, numerals=numerals,
                              input_text=(f"{self.options_prefix}{options_text(raw['choices'])}"
                                          f"{self.passage_prefix}{raw['translation']}"))
