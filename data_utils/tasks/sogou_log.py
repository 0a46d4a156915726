"""Sogou-Log: rank document titles for a search query (CUGE's Sogou-Log; original §5.2, where it never ran).

Layouts (JSON lines, detected per file from its first record; the public CUGE copy uses the same fields):
  * pairs (train, usually dev): ``{"query", "pos_doc", "neg_doc"}`` -> a group [pos, neg] with label_index 0;
  * lists (test): ``{"query_id", "query", "doc": [{"sogou_id", "title", "label"?}]}`` -> one group per query;
    ``label`` (relevance, a number) enables MRR / NDCG.
As the original, pairs whose query holds mojibake (锟斤拷 or U+FFFD) or whose two documents are equal are left
out; how many is logged.

Encoder, one per document: 查询：query标题：title (a too long title is cut to ``max_enc_len``; the original
dropped pairs over 150 tokens). Decoder input [<s>, <s_0>]; the score of a document is the logit of 相关 at the
last decoder position, trained with a softmax over the group (pairwise). Metric: pairwise accuracy (the
original's: the fraction of (more relevant, less relevant) pairs scored in the right order), plus MRR and NDCG
when relevance labels are given. Records: ``prediction`` = the group's scores, ``reference`` = its relevances.
No prompt layout: the original never supported prompt tuning for this task.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from data_utils.errors import DataError
from data_utils.prompt import join_truncating
from data_utils.tasks.base import (BadLines, Task, Tokenizer, as_object, get_str, iter_json_values, labelled,
                                   single_token_id)

logger = logging.getLogger(__name__)


class SogouLog(Task):
    name = "sogou-log"
    aliases = ("sogou_log", "sogou")
    kind = "rank"
    default_ext = ".json"
    alt_exts = (".jsonl",)
    main_metric = "pairwise_accuracy"
    score_token = "相关"  # "relevant": its logit at the last decoder position is the document's score
    query_prefix, title_prefix = "查询：", "标题："
    mojibake = ("锟斤拷", "\ufffd")

    def read_file(self, path: Path, *, split: str, bad: BadLines) -> list[dict]:
        pairs: Optional[bool] = None  # decided by the file's first record
        examples: list[dict] = []
        dropped = 0
        for line, value in iter_json_values(path, bad):
            try:
                obj = as_object(value)
                if pairs is None:
                    pairs = "pos_doc" in obj
                example = self._pair(obj, len(examples)) if pairs else self._list(obj, len(examples))
            except DataError as err:
                bad.handle(err, line)
                continue
            if pairs and self._useless_pair(example):
                dropped += 1
                continue
            examples.append(example)
        if dropped:
            logger.warning("%s: left out %d pair(s) with a mojibake query or pos_doc == neg_doc (as the original)",
                           path, dropped)
        return examples

    def _useless_pair(self, example: dict) -> bool:
        """The original's filter: a garbled query, or a pair that cannot teach an order."""
        return any(m in example["query"] for m in self.mojibake) or example["docs"][0] == example["docs"][1]

    def _pair(self, obj: dict, index: int) -> dict:
        return {"id": obj.get("id", index), "query": get_str(obj, "query"),
                "docs": [get_str(obj, "pos_doc"), get_str(obj, "neg_doc")], "doc_ids": None,
                "relevance": [1.0, 0.0]}

    def _list(self, obj: dict, index: int) -> dict:
        docs = obj.get("doc")
        if not isinstance(docs, list) or not docs:
            raise DataError("must be a non-empty list of {sogou_id, title}", field="doc")
        titles, doc_ids, relevance = [], [], []
        for number, doc_value in enumerate(docs):
            doc = as_object(doc_value)
            titles.append(get_str(doc, "title"))
            doc_ids.append(doc.get("sogou_id", number))
            label = doc.get("label")
            if label is not None and (isinstance(label, bool) or not isinstance(label, (int, float))):
                raise DataError(f"doc {number}: relevance label must be a number, got {label!r}", field="label")
            relevance.append(label)
        if any(r is None for r in relevance) and not all(r is None for r in relevance):
            raise DataError("either every doc of a query has a relevance label or none has", field="label")
        return {"id": obj.get("query_id", index), "query": get_str(obj, "query"), "docs": titles,
                "doc_ids": doc_ids, "relevance": None if relevance[0] is None else [float(r) for r in relevance]}

    def encode(self, raw: dict, tokenizer: Tokenizer, *, prompt: Any = None,
               max_enc_len: Optional[int] = None) -> dict:
        if prompt is not None:
            raise ValueError("sogou-log has no prompt layout (the original never prompt-tuned it); "
                             "drop --prompt-tune for this task")
        score_id = single_token_id(tokenizer, self.score_token, role="Sogou-Log score word")
        head = (tokenizer.encode(self.query_prefix) + tokenizer.encode(raw["query"])
                + tokenizer.encode(self.title_prefix))
        group = [join_truncating([head, tokenizer.encode(doc)], 1, max_enc_len) for doc in raw["docs"]]
        # label_index: the group member the pairwise loss treats as positive (pairs: the pos_doc, index 0)
        label_index = 0 if raw["doc_ids"] is None else -1
        return {
            "id": raw["id"],
            "group_enc_ids": group,
            "answer_ids": [score_id],
            "candidate_ids": [score_id],
            "label_index": label_index,
            "doc_ids": raw["doc_ids"],
            "input_text": f"{self.query_prefix}{raw['query']}",
            "reference": raw["relevance"],
        }

    def compute_metrics(self, records: Sequence[Mapping]) -> dict[str, float]:
        from data_utils.metrics import mrr, ndcg, pairwise_accuracy

        scored = labelled(records)
        if not scored:
            return {"num_scored": 0.0}
        scores = [[float(s) for s in r["prediction"]] for r in scored]
        relevance = [[float(x) for x in r["reference"]] for r in scored]
        pos, neg = [], []
        for group_scores, group_rel in zip(scores, relevance):
            for i, rel_i in enumerate(group_rel):
                for j, rel_j in enumerate(group_rel):
                    if rel_i > rel_j:
                        pos.append(group_scores[i])
                        neg.append(group_scores[j])
        metrics = {"pairwise_accuracy": float(pairwise_accuracy(pos, neg)) if pos else 0.0,
                   "num_scored": float(len(scored))}
        metrics["mrr"] = float(mrr(scores, relevance))
        metrics["ndcg"] = float(ndcg(scores, relevance))
        return metrics
