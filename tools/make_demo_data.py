"""Write a small, learnable LCQMC-format dataset (and a text corpus for tools/build_vocab.py).

Pairs are a sentence and a rewording of it. The rewording keeps the meaning (相似, label 1) when it only adds an
adverb or swaps a synonym, and contradicts it (矛盾, label 0) when it negates the verb, the way many real LCQMC
negatives differ. The labels are therefore learnable from the text alone, which is what a demo needs: a tiny
model trained for a minute on a laptop CPU goes well above chance.

    python tools/make_demo_data.py --out demo_data/lcqmc [--train 2000 --dev 200 --test 200 --seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile

SUBJECTS = ["我", "你", "他", "她", "我们", "他们", "老师", "学生", "妈妈", "爸爸", "朋友", "同学", "医生", "孩子"]
VERBS = {  # verb -> synonyms that keep the meaning
    "喜欢": ["喜爱", "爱"], "想要": ["希望得到", "想得到"], "需要": ["要", "得要"], "知道": ["了解", "清楚"],
    "看见": ["看到", "瞧见"], "买了": ["购买了", "买下了"], "找到": ["寻到", "找着"], "相信": ["信任", "信"],
}
OBJECTS = ["苹果", "这本书", "那部电影", "新手机", "音乐", "答案", "这个城市", "咖啡", "足球", "电脑", "老房子",
           "小猫", "花园", "火车票", "天气预报", "中文歌"]
ADVERBS = ["真的", "非常", "确实", "一直", "也"]
NEGATIONS = ["不", "没有", "从不", "并不"]


def _pair(rng: random.Random) -> tuple[str, str, int]:
    subject, verb, obj = rng.choice(SUBJECTS), rng.choice(list(VERBS)), rng.choice(OBJECTS)
    first = f"{subject}{verb}{obj}"
    if rng.random() < 0.5:
        second_verb = rng.choice(VERBS[verb]) if rng.random() < 0.5 else verb
        adverb = rng.choice(ADVERBS) if rng.random() < 0.6 else ""
        return first, f"{subject}{adverb}{second_verb}{obj}", 1
    return first, f"{subject}{rng.choice(NEGATIONS)}{verb}{obj}", 0


def make_split(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b, label = _pair(rng)
        if rng.random() < 0.5:  # the order of the pair carries no signal
            a, b = b, a
        rows.append({"sentence1": a, "sentence2": b, "label": label})
    return rows


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_dataset(out_dir: str, *, train: int, dev: int, test: int, seed: int = 0) -> dict[str, int]:
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    counts, corpus = {}, []
    for split, n in (("train", train), ("dev", dev), ("test", test)):
        rows = make_split(n, rng)
        counts[split] = len(rows)
        _write_atomic(os.path.join(out_dir, f"{split}.jsonl"),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        corpus.extend(f"{r['sentence1']}\n{r['sentence2']}" for r in rows)
    # The template and label words of the LCQMC task must be tokens of the demo vocab.
    # (and `；`, which the prompt layouts insert between segments).
    corpus.append("“”与的意思\n相似\n矛盾\n意思\n；\n相似 矛盾 意思 ； 相似 矛盾 意思 ；")
    _write_atomic(os.path.join(out_dir, "corpus.txt"), "\n".join(corpus) + "\n")
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--dev", type=int, default=200)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    counts = write_dataset(args.out, train=args.train, dev=args.dev, test=args.test, seed=args.seed)
    print(json.dumps({"out": args.out, **counts}))


if __name__ == "__main__":
    main()
