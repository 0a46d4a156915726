"""The Task base class and the helpers every task file shares.

A task (one file per task in this package) is data plus three small functions:

* ``read_file`` turns one data file into raw examples (dicts with an ``id``), accepting both the original CPM-2
  field layout and the public release layout, detected per file;
* ``encode`` turns one raw example into ids following the original token layout
  (``reference/original-toolkit.md`` §5.2, §6) with template and label words looked up *by string*;
* ``compute_metrics`` scores the records written to ``predictions.jsonl``.

Everything else (finding the split file, decoding UTF-8, JSON / TSV parsing with ``file:line:`` errors,
``--skip-bad-lines`` counting, field type checks) lives here so that the task files only say what differs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

from data_utils.errors import DataError
from data_utils.prompt import PromptLayout, as_prompt_config, join_truncating

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

SPLITS = ("train", "dev", "test", "infer")
# A public test set often ships without answers (CCPM's test_public.jsonl); train and dev must be labelled
# because training and model selection need the gold answer.
LABEL_OPTIONAL_SPLITS = frozenset({"test", "infer"})
# Public releases name their splits differently; these are tried after DATA_PATH/{split}{ext}.
PUBLIC_SPLIT_ALIASES: Mapping[str, tuple[str, ...]] = {
    "train": (),
    "dev": ("valid",),
    "test": ("test_public",),
    "infer": ("test", "test_public"),
}
KINDS = ("classify", "generate", "rank")


class Tokenizer(Protocol):
    """What the tasks need from `tokenization_enc_dec.EncDecTokenizer` (docs/design.md, tokenizer)."""

    def encode(self, text: str) -> list[int]: ...

    def token_to_id(self, token: str) -> int: ...

    def get_sentinel_id(self, i: int) -> int: ...


@dataclass(frozen=True)
class DecodingDefaults:
    """Per-task generation defaults (the original scripts' values); CLI flags override them when given."""

    num_beams: int = 1  # 1 = no beam search; WMT uses 4 (the original's hard-coded beam size)
    do_sample: bool = False  # greedy unless the task sampled in the original (AdGen)
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1.0 = no nucleus filtering
    temperature: float = 1.0
    out_seq_length: int = 256  # the original's --out-seq-length default: max new tokens
    length_penalty: float = 1.0  # beam score = log-prob / length ** length_penalty
    no_repeat_ngram_size: int = 0  # 0 = off


@dataclass
class ReadResult:
    """What reading one split produced: the raw examples, the files read, and the bad lines skipped."""

    examples: list[dict]
    files: list[Path]
    skipped: list[DataError] = field(default_factory=list)


# Reading helpers live in readers.py; task files import them from here as before.
from data_utils.tasks.readers import (BadLines, _show, as_object, first_non_space_char, get_label,  # noqa: F401
                                      get_str, get_str_list, iter_json_values, iter_tsv_rows, read_lines)


def single_token_id(tokenizer: Tokenizer, word: str, *, role: str) -> int:
    """The id of ``word``, which must be one token of the loaded vocab (label words, numerals, template words).

    The original hard-coded these ids for the Chinese vocab (``reference/original-toolkit.md`` §4.3; its 八 was
    1031 = 事件); looking them up by string keeps a template right for any vocab, or fails here, clearly.
    """
    try:
        return tokenizer.token_to_id(word)
    except KeyError:
        raise ValueError(
            f"{role} {word!r} is not a single token of the loaded vocab; this task needs it as one token "
            "(use the CPM-2 vocab, or a vocab that contains it)"
        ) from None


# --------------------------------------------------------------------------------------------------------------
# The Task base class
# --------------------------------------------------------------------------------------------------------------


class Task:
    """A downstream task: how to find, read, encode and score its data (docs/design.md, data_utils).

    Subclasses set the class attributes and implement ``read_file``, ``encode`` and ``compute_metrics``.
    """

    name: str = ""
    kind: str = ""  # "classify" | "generate" | "rank"
    aliases: tuple[str, ...] = ()  # extra registry names (e.g. "math23k")
    default_ext: str = ".json"  # the original scripts' --data-ext
    alt_exts: tuple[str, ...] = ()  # other extensions the public release uses, tried after the given one
    # Public file names per split, read together (C3: c3-d-dev.json + c3-m-dev.json); tried last.
    public_split_files: Mapping[str, tuple[str, ...]] = {}
    main_metric: str = ""
    decoding: DecodingDefaults = DecodingDefaults()
    max_enc_len: Optional[int] = None  # default encoder truncation (C3: 768, the original's); None = none

    # ---- reading -------------------------------------------------------------------------------------------

    def split_files(self, data_path: PathLike, split: str, ext: Optional[str] = None) -> list[Path]:
        """The file(s) holding ``split``: ``data_path`` itself when it is a file, else the first existing of
        ``{split}{ext}``, the public aliases (``valid`` for dev, ``test_public`` for test) and the task's public
        file names."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        path = Path(data_path)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise DataError("--data-path does not exist (give a folder with the split files, or one file)",
                            file=path)
        tried: list[str] = []
        for group in self._candidate_names(split, ext):
            found = [path / name for name in group if (path / name).is_file()]
            tried.extend(name for name in group if name not in tried)
            if found:
                return found
        raise DataError(
            f"no {split} file for task {self.name!r}; looked for {', '.join(tried)} "
            "(set --data-path to the folder holding them, or to the file itself)",
            file=path,
        )

    def _candidate_names(self, split: str, ext: Optional[str]) -> list[tuple[str, ...]]:
        ext = self.default_ext if not ext else (ext if ext.startswith(".") else "." + ext)
        exts = [ext] + [e for e in (self.default_ext, *self.alt_exts) if e != ext]
        groups: list[tuple[str, ...]] = []
        for stem in (split, *PUBLIC_SPLIT_ALIASES[split]):
            groups.extend((stem + e,) for e in exts)
        if split in self.public_split_files:
            groups.append(tuple(self.public_split_files[split]))
        return groups

    def read_split(
        self, data_path: PathLike, split: str, ext: Optional[str] = None, *, skip_bad_lines: bool = False
    ) -> list[dict]:
        """Raw examples of ``split`` (each with an ``id``); see :meth:`read_split_result`."""
        return self.read_split_result(data_path, split, ext, skip_bad_lines=skip_bad_lines).examples

    def read_split_result(
        self, data_path: PathLike, split: str, ext: Optional[str] = None, *, skip_bad_lines: bool = False
    ) -> ReadResult:
        """Read every file of ``split``; a bad line raises `DataError` ("file:line: field: what is wrong"),
        or with ``skip_bad_lines`` is counted, skipped and logged."""
        files = self.split_files(data_path, split, ext)
        result = ReadResult(examples=[], files=files)
        for path in files:
            bad = BadLines(path, skip=skip_bad_lines)
            result.examples.extend(self.read_file(path, split=split, bad=bad))
            result.skipped.extend(bad.skipped)
        if result.skipped:
            logger.warning("%s %s: skipped %d bad line(s) (--skip-bad-lines); first: %s",
                           self.name, split, len(result.skipped), result.skipped[0])
        if not result.examples:
            raise DataError(f"no {split} examples for task {self.name!r} in this file", file=files[0])
        seen: dict[Any, int] = {}
        for number, example in enumerate(result.examples):
            try:
                hash(example["id"])
            except TypeError:  # a JSON list or object given as "id" (found by tests/reliability fuzzing)
                raise DataError(f"example {number} has id {example['id']!r}: an id must be a string or a number",
                                file=files[0], field="id") from None
            if example["id"] in seen:
                raise DataError(f"example id {example['id']!r} appears twice (examples {seen[example['id']]} "
                                f"and {number}); ids must be unique within a split", file=files[0])
            seen[example["id"]] = number
        logger.info("%s %s: %d examples from %s", self.name, split, len(result.examples),
                    ", ".join(str(f) for f in files))
        return result

    def read_file(self, path: Path, *, split: str, bad: BadLines) -> list[dict]:
        """Raw examples of one file, its layout detected from its content."""
        raise NotImplementedError

    def labels_optional(self, split: str) -> bool:
        return split in LABEL_OPTIONAL_SPLITS

    # ---- encoding ------------------------------------------------------------------------------------------

    def encode(self, raw: dict, tokenizer: Tokenizer, *, prompt: Any = None,
               max_enc_len: Optional[int] = None) -> dict:
        """Ids for one raw example (docs/design.md, ``Task.encode``)."""
        raise NotImplementedError

    def end_of_target(self, tokenizer: Tokenizer) -> list[int]:
        """Generation targets end with ``<s_1>``, the stop token; single-token answers have no end marker."""
        return [tokenizer.get_sentinel_id(1)] if self.kind == "generate" else []

    # ---- scoring -------------------------------------------------------------------------------------------

    def compute_metrics(self, records: Sequence[Mapping]) -> dict[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Task {self.name} ({self.kind})>"


def labelled(records: Sequence[Mapping]) -> list[Mapping]:
    """The records that carry a reference (an unlabelled test set has none, and gets no score)."""
    return [r for r in records if r.get("reference") is not None]


def encoded(*, raw: Mapping, enc_ids: list[int], answer_ids: list[int], input_text: str, reference: Any,
            candidate_ids: Sequence[int] = (), label_index: int = -1) -> dict:
    """The ``encode`` output dict of docs/design.md (one place, so every task returns the same keys).

    Unlabelled examples have ``answer_ids == []`` and ``label_index == -1``: the collate then builds decoder input
    [<s>, <s_0>] (the classification read-out position) with no loss on an answer. The original put a <pad>
    placeholder there instead.
    """
    return {
        "id": raw["id"],
        "enc_ids": enc_ids,
        "answer_ids": answer_ids,
        "candidate_ids": list(candidate_ids),
        "label_index": label_index,
        "input_text": input_text,
        "reference": reference,
    }


class ClassifyTask(Task):
    """A task answered by one label word / numeral, scored by accuracy over the records with a reference.

    ``prediction`` and ``reference`` in the records are the label words (e.g. 相似, 三).
    """

    kind = "classify"
    main_metric = "accuracy"

    def compute_metrics(self, records: Sequence[Mapping]) -> dict[str, float]:
        from data_utils.metrics import accuracy

        scored = labelled(records)
        if not scored:
            return {"num_scored": 0.0}
        preds = [str(r["prediction"]).strip() for r in scored]
        refs = [str(r["reference"]).strip() for r in scored]
        return {"accuracy": float(accuracy(preds, refs)), "num_scored": float(len(scored))}


# Option numerals of the multiple-choice tasks (C3, CCPM). The original hard-coded their ids and had 八 wrong
# (1031 = 事件, `reference/original-toolkit.md` §4.3); here each is looked up by string when used.
NUMERALS = ("一", "二", "三", "四", "五", "六", "七", "八", "九", "十")
OPTION_MARK, OPTION_END = "、", "；"  # 一、choice；二、choice；...


def check_option_count(choices: Sequence[str], field_name: str) -> None:
    if not 1 <= len(choices) <= len(NUMERALS):
        raise DataError(f"must hold 1 to {len(NUMERALS)} options (one numeral each), got {len(choices)}",
                        field=field_name)


def options_ids(tokenizer: Tokenizer, choices: Sequence[str], *, prompts_before_each: int = 0
                ) -> tuple[list[int], list[int]]:
    """``numeral 、 choice ；`` for each option (the original's layout), and the numeral ids (the candidates).

    In prompt mode ``prompts_before_each`` positions precede each option, numbered from 0 (C3/CCPM: 3 each, so
    option i gets P[3i..3i+3)); the task's front gap then starts after them.
    """
    mark = single_token_id(tokenizer, OPTION_MARK, role="option separator")
    end = single_token_id(tokenizer, OPTION_END, role="option separator")
    numerals = [single_token_id(tokenizer, NUMERALS[i], role="option numeral") for i in range(len(choices))]
    ids: list[int] = []
    for i, choice in enumerate(choices):
        ids += PromptLayout.option_prompt(i, prompts_before_each) if prompts_before_each else []
        ids += [numerals[i], mark] + tokenizer.encode(choice) + [end]
    return ids, numerals


def options_text(choices: Sequence[str]) -> str:
    """The options as the encoder reads them, ``一、c1；二、c2；...`` (for the records' ``input``)."""
    return "".join(f"{NUMERALS[i]}{OPTION_MARK}{c}{OPTION_END}" for i, c in enumerate(choices))


def choice_encoded(*, raw: Mapping, enc_ids: list[int], numerals: list[int], input_text: str) -> dict:
    """``encoded`` for a multiple-choice example (C3, CCPM): the answer is the numeral of option ``raw["label"]``
    (None when unlabelled), scored among this example's numerals."""
    label: Optional[int] = raw["label"]
    return encoded(raw=raw, enc_ids=enc_ids, answer_ids=[numerals[label]] if label is not None else [],
                   candidate_ids=numerals, label_index=label if label is not None else -1, input_text=input_text,
                   reference=NUMERALS[label] if label is not None else None)


class GenerateTask(Task):
    """A task whose answer is generated text ending with ``<s_1>`` (Math, LCSTS, AdGen, WMT)."""

    kind = "generate"

    def generation_output(self, raw: Mapping, tokenizer: Tokenizer, *, enc_ids: list[int], target: Optional[str],
                          input_text: str) -> dict:
        """The encode dict for a target text (None for unlabelled data: no answer ids, see `encoded`)."""
        answer = tokenizer.encode(target) + self.end_of_target(tokenizer) if target is not None else []
        return encoded(raw=raw, enc_ids=enc_ids, answer_ids=answer,
                       input_text=input_text, reference=target)

    def encode_text_to_target(self, raw: Mapping, tokenizer: Tokenizer, *, text: str, target: Optional[str],
                              prompt: Any, max_enc_len: Optional[int]) -> dict:
        """Encoder input = one text (Math, LCSTS, WMT): truncated as is, or laid out with the prompt positions of
        ``self.prompt_layout`` (its ratios' middle entry is ignored there, as in the original)."""
        config = as_prompt_config(prompt)
        ids = tokenizer.encode(text)
        if config is None:
            enc_ids = join_truncating([ids], 0, max_enc_len)
        else:
            enc_ids = self.prompt_layout.build([ids], config, body=0, max_len=max_enc_len)
        return self.generation_output(raw, tokenizer, enc_ids=enc_ids, target=target, input_text=text)

    @staticmethod
    def texts(records: Sequence[Mapping]) -> tuple[list[str], list[str]]:
        """(predictions, references) of the labelled records, as strings."""
        scored = labelled(records)
        return [str(r["prediction"]) for r in scored], [str(r["reference"]) for r in scored]
