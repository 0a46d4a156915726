"""WMT20 news translation with the Chinese-English CPM-2 (``bpe_cn_en`` vocab; original §5.2).

Layouts:
  * CPM-2: a JSON list ``[{"source", "target", "index"}]``. The original's reader feeds ``target`` to the encoder
    and trains the decoder on ``source`` (the field names are swapped); kept, so that its files mean the same;
  * public: two parallel plain-text files ``{split}.en`` and ``{split}.zh`` (one sentence per line), translated
    English -> Chinese (the paper's direction). ``--data-path`` may also name either file of the pair.

Encoder: the source sentence, untruncated; no template. Target: the translation, then <s_1>.
Metric: sacreBLEU with its ``zh`` tokenizer. Decoding: beam search, 4 beams (the original's hard-coded size;
its length-normalised score = length penalty 1.0).
Prompt tuning: P[0..c0) source P[c0..c1), c0 = int(r0 n), c1 = int((r0 + r2) n); ratio_list[1] is ignored (as in
the original); default [1, 0, 0].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from data_utils.errors import DataError
from data_utils.tasks.base import (BadLines, DecodingDefaults, GenerateTask, Tokenizer, as_object, get_str,
                                   iter_json_values, read_lines)
from data_utils.tasks.math import TEXT_ONLY_LAYOUT


class WMTENCN(GenerateTask):
    name = "wmtencn"
    aliases = ("wmt20",)
    default_ext = ".json"
    source_lang, target_lang = "en", "zh"  # public parallel files: {split}.en -> {split}.zh
    public_split_files = {split: (f"{split}.en",) for split in ("train", "dev", "test", "infer")}
    main_metric = "bleu"
    decoding = DecodingDefaults(num_beams=4)
    prompt_layout = TEXT_ONLY_LAYOUT

    def read_file(self, path: Path, *, split: str, bad: BadLines) -> list[dict]:
        if path.suffix in (f".{self.source_lang}", f".{self.target_lang}"):
            return self._parallel(path, split=split, bad=bad)
        optional = self.labels_optional(split)
        examples: list[dict] = []
        for line, value in iter_json_values(path, bad):
            try:
                obj = as_object(value)
                examples.append({
                    "id": obj.get("index", len(examples)),
                    # the original's swap: the encoder reads "target", the decoder learns "source"
                    "source_text": get_str(obj, "target"),
                    "target_text": get_str(obj, "source", optional=optional),
                })
            except DataError as err:
                bad.handle(err, line)
        return examples

    def _parallel(self, path: Path, *, split: str, bad: BadLines) -> list[dict]:
        source_path = path.with_suffix(f".{self.source_lang}")
        target_path = path.with_suffix(f".{self.target_lang}")
        if not source_path.is_file():
            raise DataError(f"the source side {source_path.name} of the parallel pair is missing", file=source_path)
        sources = _without_trailing_blank(read_lines(source_path, bad))
        targets: list[Optional[str]]
        if target_path.is_file():
            target_bad = BadLines(target_path, skip=bad.skip)
            targets = list(_without_trailing_blank(read_lines(target_path, target_bad)))
            bad.skipped.extend(target_bad.skipped)
        elif self.labels_optional(split):
            targets = [None] * len(sources)
        else:
            raise DataError(f"the target side {target_path.name} of the parallel pair is missing", file=target_path)
        if len(targets) != len(sources):
            raise DataError(f"{len(sources)} source lines but {len(targets)} lines in {target_path.name}; "
                            "parallel files must align line by line", file=source_path)
        examples = []
        for number, (source, target) in enumerate(zip(sources, targets), start=1):
            if not source.strip() or (target is not None and not target.strip()):
                bad.handle(DataError("empty sentence on one side of the pair"), number)
                continue
            examples.append({"id": number - 1, "source_text": source.strip(),
                             "target_text": target.strip() if target is not None else None})
        return examples

    def encode(self, raw: dict, tokenizer: Tokenizer, *, prompt: Any = None,
               max_enc_len: Optional[int] = None) -> dict:
        return self.encode_text_to_target(raw, tokenizer, text=raw["source_text"], target=raw["target_text"],
                                          prompt=prompt, max_enc_len=max_enc_len)

    def compute_metrics(self, records: Sequence[Mapping]) -> dict[str, float]:
        from data_utils.metrics import sacrebleu_zh

        preds, refs = self.texts(records)
        if not refs:
            return {"num_scored": 0.0}
        return {"bleu": float(sacrebleu_zh(preds, refs)), "num_scored": float(len(refs))}


def _without_trailing_blank(lines: list[str]) -> list[str]:
    """A final newline leaves an empty last line; drop trailing blank lines before aligning the two sides."""
    end = len(lines)
    while end and not lines[end - 1].strip():
        end -= 1
    return lines[:end]
