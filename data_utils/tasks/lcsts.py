"""LCSTS: summarise a Weibo post (Hu et al. 2015; ``reference/original-toolkit.md`` §5.2).

Layouts (detected per file from its first character):
  * CPM-2: JSON lines ``{"text", "summary"}``;
  * public: ``PART_I.txt`` / ``PART_II.txt`` / ``PART_III.txt`` (read as train / dev / test when the folder has
    no ``{split}.jsonl``), pseudo-XML ``<doc id=N>[<human_label>k</human_label>]<summary>..</summary>
    <short_text>..</short_text></doc>``. Documents with a ``human_label`` below 3 are left out (the standard
    protocol for PART_II/III); how many is logged.

Encoder: the text, untruncated. Target: the summary, then <s_1>. Metric: character-level ROUGE-1/2/L F
(the paper reports ROUGE-L). Decoding: greedy.
Prompt tuning: P[0..c0) text P[c0..c1), c0 = int(r0 n), c1 = int((r0 + r2) n); ratio_list[1] is ignored (as in
the original); default [1, 0, 0].
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from data_utils.errors import DataError
from data_utils.tasks.base import (BadLines, DecodingDefaults, GenerateTask, Tokenizer, as_object,
                                   first_non_space_char, get_str, iter_json_values, read_lines)
from data_utils.tasks.math import TEXT_ONLY_LAYOUT

logger = logging.getLogger(__name__)

_DOC_RE = re.compile(r"<doc(?P<attrs>[^>]*)>(?P<body>.*?)</doc>", re.S)
_ID_RE = re.compile(r"id\s*=\s*\"?(?P<id>[^\s\">]+)")


def _tag(body: str, name: str) -> Optional[str]:
    match = re.search(rf"<{name}>(.*?)</{name}>", body, re.S)
    return match.group(1).strip() if match else None


class LCSTS(GenerateTask):
    name = "lcsts"
    default_ext = ".jsonl"
    public_split_files = {"train": ("PART_I.txt",), "dev": ("PART_II.txt",), "test": ("PART_III.txt",)}
    main_metric = "rouge-l"
    decoding = DecodingDefaults()  # greedy, up to 256 tokens
    prompt_layout = TEXT_ONLY_LAYOUT
    min_human_label = 3  # the LCSTS protocol: evaluate on PART_III documents rated 3 to 5

    def read_file(self, path: Path, *, split: str, bad: BadLines) -> list[dict]:
        optional = self.labels_optional(split)
        records = self._xml_docs(path, bad) if first_non_space_char(path) == "<" else iter_json_values(path, bad)
        examples: list[dict] = []
        low_rated = 0
        for line, value in records:
            try:
                obj = as_object(value)
                label = obj.get("human_label")
                if label is not None and not (isinstance(label, int) or str(label).strip().isdigit()):
                    raise DataError(f"must be an integer 1-5, got {label!r}", field="human_label")
                if label is not None and int(label) < self.min_human_label:
                    low_rated += 1
                    continue
                examples.append({
                    "id": obj.get("id", len(examples)),
                    "text": get_str(obj, "text"),
                    "summary": get_str(obj, "summary", optional=optional),
                })
            except DataError as err:
                bad.handle(err, line)
        if low_rated:
            logger.info("%s: left out %d document(s) with human_label < %d", path, low_rated, self.min_human_label)
        return examples

    def _xml_docs(self, path: Path, bad: BadLines) -> Iterator[tuple[int, Any]]:
        """Yield (line, {"id", "text", "summary", "human_label"?}) for each <doc> of a public PART_*.txt file."""
        text = "\n".join(read_lines(path, bad))
        position, line, found = 0, 1, False
        for match in _DOC_RE.finditer(text):
            line += text.count("\n", position, match.start())
            position, found = match.start(), True
            body = match.group("body")
            doc: dict[str, Any] = {"text": _tag(body, "short_text"), "summary": _tag(body, "summary")}
            doc_id = _ID_RE.search(match.group("attrs"))
            if doc_id:
                doc["id"] = doc_id.group("id")
            label = _tag(body, "human_label")
            if label is not None:
                if not label.isdigit():
                    yield line, DataError(f"must be an integer 1-5, got {label!r}", field="human_label")
                    continue
                doc["human_label"] = int(label)
            for name, tag in (("text", "short_text"), ("summary", "summary")):
                if doc[name] is None:
                    yield line, DataError(f"<doc> has no <{tag}>...</{tag}>", field=tag)
                    break
            else:
                yield line, doc
        if not found:
            raise DataError("no <doc>...</doc> blocks found (expected the LCSTS PART_*.txt layout)", file=path)

    def encode(self, raw: dict, tokenizer: Tokenizer, *, prompt: Any = None,
               max_enc_len: Optional[int] = None) -> dict:
        return self.encode_text_to_target(raw, tokenizer, text=raw["text"], target=raw["summary"],
                                          prompt=prompt, max_enc_len=max_enc_len)

    def compute_metrics(self, records: Sequence[Mapping]) -> dict[str, float]:
        from data_utils.metrics import rouge_char

        preds, refs = self.texts(records)
        if not refs:
            return {"num_scored": 0.0}
        scores = rouge_char(preds, refs)
        return {**{key: float(value) for key, value in scores.items()}, "num_scored": float(len(refs))}
