"""A plain re-implementation of the original CPM-2 tokenizers' algorithm: the reference the fast one must equal.

Deliberately naive, as the original `tokenization_enc_dec.py` / `tokenization_enc_dec_encn.py` were: a per-character
full-width fold, `jieba.cut` over the whole text, and for each piece a longest-match loop that tries every end
position from the end of the piece down, joining characters each time. No caches, no length bound. Used by
tests/test_tokenization_reference.py and benchmarks/bench_tokenizer.py (the "peer" of the speed comparison),
which also share the real-text loaders at the end.
Only the one-token duplication bug of the Chinese-English encode is left out (golden file `note`).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional

import jieba

jieba.setLogLevel(logging.WARNING)

KEPT = ["，", "。", "！", "（", "）", "？", "、", "；", "："]


def q2b(char: str) -> str:
    if char in KEPT:
        return char
    code = ord(char)
    code = 0x20 if code == 0x3000 else code - 0xFEE0
    if code < 0x20 or code > 0x7E:
        return char
    return chr(code)


def contains_chinese(text: str) -> bool:
    for char in text:
        if "\u4e00" <= char <= "\u9fff":
            return True
    return text == "\u2582"


class ReferenceTokenizer:
    def __init__(self, vocab_file: str) -> None:
        self.encoder: Dict[str, int] = {}
        with open(vocab_file, encoding="utf-8") as f:
            for index, line in enumerate(f):
                self.encoder[line.strip()] = index
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.cn_en = "<go>" in self.encoder
        self.space_id = self.encoder["\u2582"]

    def wordpiece(self, piece: str) -> List[str]:
        chars = list(piece)
        if len(chars) > 200:
            return ["<unk>"]
        start, out = 0, []
        while start < len(chars):
            end, found = len(chars), None
            while start < end:
                sub = "".join(chars[start:end])
                if self.cn_en and not contains_chinese(sub) and start > 0:
                    sub = "##" + sub
                if sub in self.encoder:
                    found = sub
                    break
                end -= 1
            if found is None:
                out.append("<unk>")
                start += 1
            else:
                out.append(found)
                start = end
        return out

    def tokenize(self, text: str) -> List[str]:
        tokens = []
        for piece in jieba.cut(text, cut_all=False):
            piece = piece.replace(" ", "\u2582").replace("\n", "\u2583")
            tokens.extend(self.wordpiece(piece))
        return tokens

    def encode(self, text: str) -> List[int]:
        if not self.cn_en:
            text = "".join(q2b(c) for c in text)
        ids = [self.encoder[t] for t in self.tokenize(text)]
        if not self.cn_en or len(ids) <= 1:
            return ids
        is_en = lambda i: not contains_chinese(self.decoder[i])  # noqa: E731
        out = [ids[0]]
        for i in range(1, len(ids) - 1):
            if ids[i] == self.space_id and is_en(ids[i - 1]) and is_en(ids[i + 1]):
                continue
            out.append(ids[i])
        out.append(ids[-1])
        return out


# ----------------------------------------------------------------------------------------------- real text
NUMERALS = "一二三四五六七八"


def c3_texts(c3_dir, max_docs: Optional[int] = None) -> List[str]:
    """C3 texts as a task encodes them: per question the passage (so each passage repeats once per question),
    the question and each option, plus the full-fine-tuning prompt 问题：q选项：一、a；...文章：passage."""
    texts: List[str] = []
    for name in ("c3-d-dev.json", "c3-d-test.json"):
        with open(os.path.join(c3_dir, name), encoding="utf-8") as f:
            docs = json.load(f)
        for context_lines, questions, _doc_id in docs[:max_docs]:
            passage = "\n".join(context_lines)
            for q in questions:
                options = "".join(f"{n}、{c}；" for n, c in zip(NUMERALS, q["choice"]))
                texts += [passage, q["question"], *q["choice"], f"问题：{q['question']}选项：{options}文章：{passage}"]
    return texts


def ccpm_texts(ccpm_dir, max_lines: Optional[int] = None) -> List[str]:
    """CCPM texts: the modern-Chinese translation, the four classical choices and the full prompt."""
    texts: List[str] = []
    for name in ("valid.jsonl", "test_public.jsonl"):
        with open(os.path.join(ccpm_dir, name), encoding="utf-8") as f:
            lines = f.readlines()[:max_lines]
        for line in lines:
            row = json.loads(line)
            options = "".join(f"{n}、{c}；" for n, c in zip(NUMERALS, row["choices"]))
            texts += [row["translation"], *row["choices"], f"选项：{options}文章：{row['translation']}"]
    return texts
