"""Tokenizer throughput: our EncDecTokenizer vs a plain re-implementation of the original algorithm (SPEC §9).

    python benchmarks/bench_tokenizer.py [--data DIR] [--repeats 3] [--vocab bpe_cn]

Texts: the real C3 (per question: passage, question, options and the full prompt, so passages repeat as the C3
task encodes them) and CCPM text from ../shared/data. Every repetition of every side runs in a NEW Python
process, so caches start cold; jieba's dictionary load (~0.5 s, identical for both) happens before the clock
starts. The ids of both sides are hashed and must be equal. Prints the result of `run()` as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Union

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # the reference implementation lives beside the tests that use it
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from original_tokenizer_ref import ReferenceTokenizer, c3_texts, ccpm_texts  # noqa: E402

SHARED = pathlib.Path(os.environ.get("CPM2_SHARED_DIR", ROOT.parent / "shared"))
SIDES = ("ours", "ours_1proc", "peer")


def load_texts(data_dir: Union[str, os.PathLike]) -> List[str]:
    data_dir = pathlib.Path(data_dir)
    for sub in ("c3", "ccpm"):
        if not (data_dir / sub).is_dir():
            raise FileNotFoundError(f"{data_dir / sub} not found: pass the folder holding c3/ and ccpm/ "
                                    "(../shared/data, or set CPM2_SHARED_DIR)")
    return c3_texts(data_dir / "c3") + ccpm_texts(data_dir / "ccpm")


def run(texts_source: Union[None, str, os.PathLike, Sequence[str]] = None, repeats: int = 3,
        vocab: Union[None, str, os.PathLike] = None) -> Dict[str, object]:
    """Median texts/s of each side over `repeats` fresh processes; `ours` uses `encode_batch` (all CPUs),
    `ours_1proc` plain `encode` in one process, `peer` the reference. Raises if any output differs."""
    if texts_source is None or isinstance(texts_source, (str, os.PathLike)):
        texts = load_texts(texts_source if texts_source is not None else SHARED / "data")
    else:
        texts = list(texts_source)
    vocab_file = pathlib.Path(vocab) if vocab is not None else SHARED / "vocab" / "bpe_cn" / "vocab.txt"
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = pathlib.Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
        seconds: Dict[str, List[float]] = {side: [] for side in SIDES}
        digests = set()
        for _ in range(repeats):
            for side in SIDES:
                result = _run_side_in_new_process(side, texts_file, vocab_file)
                seconds[side].append(result["seconds"])
                digests.add(result["digest"])
    if len(digests) != 1:
        raise RuntimeError(f"outputs differ between our tokenizer and the reference ({len(digests)} digests)")
    rate = {side: len(texts) / statistics.median(seconds[side]) for side in SIDES}
    return {
        "ours": round(rate["ours"], 1), "peer": round(rate["peer"], 1), "ratio": round(rate["ours"] / rate["peer"], 2),
        "n_texts": len(texts), "outputs_equal": True,
        "ours_single_process": round(rate["ours_1proc"], 1),
        "ratio_single_process": round(rate["ours_1proc"] / rate["peer"], 2),
        "n_chars": sum(map(len, texts)), "repeats": repeats, "vocab": str(vocab_file),
        "machine": _machine(), "date": datetime.date.today().isoformat(),
    }


def _run_side_in_new_process(side: str, texts_file: pathlib.Path, vocab_file: pathlib.Path) -> Dict[str, object]:
    cmd = [sys.executable, __file__, "--side", side, "--texts", str(texts_file), "--vocab", str(vocab_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {side!r} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _time_side(side: str, texts_file: str, vocab_file: str) -> Dict[str, object]:
    """Runs inside the fresh process: load, warm jieba, then time one pass over the texts."""
    from tokenization import segment
    from tokenization_enc_dec import EncDecTokenizer

    texts = json.loads(pathlib.Path(texts_file).read_text(encoding="utf-8"))
    segment.ensure_jieba()  # dictionary load excluded from the timing for both sides
    if side == "peer":
        ref = ReferenceTokenizer(vocab_file)
        start = time.perf_counter()
        ids = [ref.encode(t) for t in texts]
    else:
        ours = EncDecTokenizer(vocab_file)
        start = time.perf_counter()
        ids = ours.encode_batch(texts) if side == "ours" else [ours.encode(t) for t in texts]
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return {"seconds": seconds, "digest": digest}


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, " \
               f"Python {platform.python_version()}"
    except OSError:
        return f"{platform.processor()}, {os.cpu_count()} CPUs"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="folder holding c3/ and ccpm/ (default ../shared/data)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", default=None, help="vocab.txt (default ../shared/vocab/bpe_cn/vocab.txt)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one timed run
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(_time_side(args.side, args.texts, args.vocab)))
        return 0
    print(json.dumps(run(args.data, repeats=args.repeats, vocab=args.vocab), ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
