"""AdGen (AdvertiseGen): write an advertisement from product attributes (Shao et al. 2019; original §5.2).

Layouts (JSON lines, detected per file from its first record):
  * CPM-2 (PHVM): ``{"title": str, "tags": [str]?, "feature": [[key, value], ...], "desc": str}``;
  * public (the ChatGLM / P-tuning v2 AdvertiseGen copy): ``{"content": "key#value*key#value...", "summary": str}``,
    read as ``title=""``, no tags, ``feature`` = the ``*``-separated ``key#value`` pairs, ``desc`` = summary.

Encoder: title；tag，tag；key：value，key：value；: the title and ；, the tags joined by ， ending with ；, then
``key：value`` pairs joined by ， with the last separator turned into ；. Target: desc, then <s_1>.
A record with nothing to describe (no title, tags or features) is a bad line (the original skipped it silently).
Metric: character BLEU-4 and Distinct-4. Decoding: sampling, top-k 40, top-p 0.9, temperature 1.0.
Prompt tuning: all n positions in front, P[0..n) context; the original ignores ratio_list here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from data_utils.errors import DataError
from data_utils.prompt import PromptLayout, as_prompt_config, join_truncating
from data_utils.tasks.base import (BadLines, DecodingDefaults, GenerateTask, Tokenizer, as_object, get_str,
                                   get_str_list, iter_json_values, single_token_id)


class AdGen(GenerateTask):
    name = "adgen"
    default_ext = ".json"
    main_metric = "bleu-4"
    decoding = DecodingDefaults(do_sample=True, top_k=40, top_p=0.9, temperature=1.0)  # the original script's
    prompt_layout = PromptLayout(default_ratios=(1.0,), gap_ratios=(0,), uses_ratio_list=False)
    part_end, item_sep, key_value_sep = "；", "，", "："  # the original's ids 18 / 16 / 17
    public_pair_sep, public_key_sep = "*", "#"  # content "类型#裤*版型#宽松"

    def read_file(self, path: Path, *, split: str, bad: BadLines) -> list[dict]:
        optional = self.labels_optional(split)
        public: Optional[bool] = None  # decided by the file's first record
        examples: list[dict] = []
        for line, value in iter_json_values(path, bad):
            try:
                obj = as_object(value)
                if public is None:
                    public = "content" in obj
                example = self._public(obj, optional) if public else self._cpm2(obj, optional)
                if not (example["title"] or example["tags"] or example["feature"]):
                    raise DataError("nothing to describe: title, tags and feature are all empty")
            except DataError as err:
                bad.handle(err, line)
                continue
            example["id"] = obj.get("id", len(examples))
            examples.append(example)
        return examples

    def _cpm2(self, obj: dict, optional: bool) -> dict:
        features = obj.get("feature")
        if "feature" not in obj:
            raise DataError("missing field", field="feature")
        if not isinstance(features, list) or not all(
                isinstance(f, list) and len(f) == 2 and all(isinstance(x, str) for x in f) for f in features):
            raise DataError(f"must be a list of [key, value] string pairs, got {str(features)[:60]}", field="feature")
        return {
            "title": get_str(obj, "title"),
            "tags": get_str_list(obj, "tags", optional=True) or [],
            "feature": [tuple(f) for f in features],
            "desc": get_str(obj, "desc", optional=optional),
        }

    def _public(self, obj: dict, optional: bool) -> dict:
        content = get_str(obj, "content")
        features = []
        for pair in content.split(self.public_pair_sep):
            if self.public_key_sep not in pair:
                raise DataError(f"pair {pair!r} has no {self.public_key_sep!r} between key and value", field="content")
            key, value = pair.split(self.public_key_sep, 1)
            features.append((key, value))
        return {"title": "", "tags": [], "feature": features, "desc": get_str(obj, "summary", optional=optional)}

    def encode(self, raw: dict, tokenizer: Tokenizer, *, prompt: Any = None,
               max_enc_len: Optional[int] = None) -> dict:
        config = as_prompt_config(prompt)
        end, sep, kv = (single_token_id(tokenizer, w, role="AdGen separator")
                        for w in (self.part_end, self.item_sep, self.key_value_sep))
        context: list[int] = tokenizer.encode(raw["title"]) + [end] if raw["title"] else []
        for tag in raw["tags"]:
            context += tokenizer.encode(tag) + [sep]
        if raw["tags"]:
            context[-1] = end
        for key, value in raw["feature"]:
            context += tokenizer.encode(key) + [kv] + tokenizer.encode(value) + [sep]
        context[-1] = end  # the last separator becomes ；
        if config is None:
            enc_ids = join_truncating([context], 0, max_enc_len)
        else:
            enc_ids = self.prompt_layout.build([context], config, body=0, max_len=max_enc_len)
        return self.generation_output(raw, tokenizer, enc_ids=enc_ids, target=raw["desc"],
                                      input_text=self.input_text(raw))

    def input_text(self, raw: dict) -> str:
        parts = [raw["title"] + self.part_end] if raw["title"] else []
        if raw["tags"]:
            parts.append(self.item_sep.join(raw["tags"]) + self.part_end)
        if raw["feature"]:
            parts.append(self.item_sep.join(f"{k}{self.key_value_sep}{v}" for k, v in raw["feature"]) + self.part_end)
        return "".join(parts)

    def compute_metrics(self, records: Sequence[Mapping]) -> dict[str, float]:
        from data_utils.metrics import bleu4_char, distinct_n

        preds, refs = self.texts(records)
        if not refs:
            return {"num_scored": 0.0}
        return {"bleu-4": float(bleu4_char(preds, refs)), "distinct-4": float(distinct_n(preds, 4)),
                "num_scored": float(len(refs))}
