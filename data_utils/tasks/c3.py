"""C3: multiple-choice reading comprehension on dialogues and mixed texts (Sun et al. 2020; original §5.2).

Layout (original and public nlpdata/c3, the same): one JSON list of documents
``[[context lines...], [{"question", "choice": [...], "answer": str, "id"?}...], doc_id]``. The public release
splits each split in two files, ``c3-d-{split}.json`` (dialogue) and ``c3-m-{split}.json`` (mixed); both are read.
One example per question; its id is the question's ``id`` when given, else ``{doc_id}-{question index}``.

Encoder (full fine-tuning): 问题：q选项：一、c1；二、c2；...文章：context, cut to 768 tokens (the passage is
shortened). The context is ALL lines joined with newlines; the original read only the first line (``d[0][0]``).
Options may number up to 十; numerals are looked up by string (the original's 八 id was wrong).
Prompt tuning drops 问题：/选项：/文章：: 3 positions before each option, then
P[k..c0) q (；) P[c0..c1) options (；) P[c1..c2) context P[c2..n); default ratios [0.5, 0.5, 0, 0]; the script's
[0.33, 0.34, 0.33, 0] gives 21 + 34 + 33 positions plus 12 in the options (r[3] is never read).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from data_utils.errors import DataError
from data_utils.prompt import PromptLayout, as_prompt_config, join_truncating
from data_utils.tasks.base import (OPTION_END, BadLines, ClassifyTask, Tokenizer, as_object, check_option_count,
                                   choice_encoded, get_str, get_str_list, iter_json_values, options_ids,
                                   options_text, single_token_id)


class C3(ClassifyTask):
    name = "c3"
    default_ext = ".json"
    public_split_files = {split: (f"c3-d-{split}.json", f"c3-m-{split}.json") for split in ("train", "dev", "test")}
    max_enc_len = 768  # the original's cut
    context_joiner = "\n"  # dialogue turns / paragraphs stay apart (the tokenizer maps a newline to ▃)
    question_prefix, options_prefix, passage_prefix = "问题：", "选项：", "文章："
    prompt_layout = PromptLayout(default_ratios=(0.5, 0.5, 0.0, 0.0), gap_ratios=(0, 1, 2), per_option=3)

    def read_file(self, path: Path, *, split: str, bad: BadLines) -> list[dict]:
        optional = self.labels_optional(split)
        examples: list[dict] = []
        for line, value in iter_json_values(path, bad):
            try:
                examples.extend(self._document(value, len(examples), optional))
            except DataError as err:
                bad.handle(err, line)
        return examples

    def _document(self, value: Any, first_index: int, optional: bool) -> list[dict]:
        if not (isinstance(value, list) and len(value) in (2, 3)):
            raise DataError("expected a document [[context lines], [questions], doc_id], got "
                            f"{type(value).__name__} of length {len(value) if isinstance(value, list) else '-'}")
        lines = get_str_list({"context": value[0]}, "context", min_len=1)
        questions = value[1]
        if not isinstance(questions, list) or not questions:
            raise DataError("must be a non-empty list of {question, choice, answer}", field="questions")
        doc_id = value[2] if len(value) == 3 else f"doc{first_index}"
        examples = []
        for number, qa_value in enumerate(questions):
            qa = as_object(qa_value)
            choices = get_str_list(qa, "choice", min_len=1)
            check_option_count(choices, "choice")
            answer = get_str(qa, "answer", optional=optional)
            if answer is not None and answer not in choices:
                raise DataError(f"{answer!r} (question {number}) is not one of the choices {choices}", field="answer")
            examples.append({
                "id": qa.get("id", f"{doc_id}-{number}"),
                "context": self.context_joiner.join(lines),
                "question": get_str(qa, "question"),
                "choices": choices,
                "label": choices.index(answer) if answer is not None else None,
            })
        return examples

    def encode(self, raw: dict, tokenizer: Tokenizer, *, prompt: Any = None,
               max_enc_len: Optional[int] = None) -> dict:
        config = as_prompt_config(prompt)
        max_len = max_enc_len or self.max_enc_len
        question, context = tokenizer.encode(raw["question"]), tokenizer.encode(raw["context"])
        per_option = self.prompt_layout.per_option if config is not None else 0
        options, numerals = options_ids(tokenizer, raw["choices"], prompts_before_each=per_option)
        if config is None:
            pieces = [tokenizer.encode(self.question_prefix), question, tokenizer.encode(self.options_prefix),
                      options, tokenizer.encode(self.passage_prefix), context]
            enc_ids = join_truncating(pieces, 5, max_len)
        else:
            sep = single_token_id(tokenizer, OPTION_END, role="prompt separator")
            enc_ids = self.prompt_layout.build([question, options, context], config, sep_id=sep,
                                               num_options=len(raw["choices"]), body=2, max_len=max_len)
        return choice_encoded(raw=raw, enc_ids=enc_ids, numerals=numerals,
                              input_text=(f"{self.question_prefix}{raw['question']}{self.options_prefix}"
                                          f"{options_text(raw['choices'])}{self.passage_prefix}{raw['context']}"))
