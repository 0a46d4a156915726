"""Build a CPM-2-layout vocab.txt from a text corpus (for demos and small models; the real vocabs are shipped).

    python tools/build_vocab.py --corpus a.txt b.txt --out DIR/vocab.txt [--size N] [--num-sentinels 190]

Layout, as bpe_cn/vocab.txt: the special tokens first in the CPM-2 order, then every character of the corpus
(so the Chinese rules never produce <unk> on it) and its most frequent jieba pieces, most frequent first, then
the sentinels <s_0>..<s_{n-1}> last. The corpus is folded full-width -> half-width first, as `encode` does.
The output depends only on the corpus and the flags (ties are broken by the token string).
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys
from typing import Iterable, List, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tokenization import rules, segment  # noqa: E402

# The CPM-2 order (reference/original-toolkit.md §4.1): ids 0..10 of bpe_cn/vocab.txt.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", rules.NEWLINE_TOKEN, "<sep>", "<pad>", "<mask>", "<eod>", "\u2581", ",",
                  rules.SPACE_TOKEN]
DEFAULT_NUM_SENTINELS = 190  # as bpe_cn: <s_0>..<s_189>
DEFAULT_MIN_COUNT = 2  # without --size, multi-character pieces seen at least this often are kept


def count_units(lines: Iterable[str]) -> tuple[collections.Counter, collections.Counter]:
    """(character counts, multi-character jieba piece counts) of the folded corpus; whitespace excluded."""
    chars: collections.Counter = collections.Counter()
    pieces: collections.Counter = collections.Counter()
    for line in lines:
        folded = rules.fold_full_width(line.rstrip("\n"))
        chars.update(c for c in folded if not c.isspace())
        # Whitespace is spelled ▂/▃ (special tokens) and a piece holding it could never be matched whole.
        pieces.update(p for p in segment.cut_text(folded) if len(p) > 1 and not any(c.isspace() for c in p))
    return chars, pieces


def build_vocab(lines: Iterable[str], *, size: Optional[int] = None, num_sentinels: int = DEFAULT_NUM_SENTINELS,
                min_count: int = DEFAULT_MIN_COUNT, pad_to_multiple: int = 1) -> List[str]:
    """The vocab tokens in id order. `size` caps the total (specials + content + sentinels); it is reached
    when the corpus has enough distinct pieces. `pad_to_multiple` adds `<unused_i>` tokens before the sentinels
    so that the total divides evenly: tensor parallelism splits the vocab over MP ranks (CPM-2's own 26,240 is a
    multiple of 128)."""
    chars, pieces = count_units(lines)
    specials = set(SPECIAL_TOKENS)
    char_list = [c for c in _by_frequency(chars) if c not in specials]
    piece_list = [p for p in _by_frequency(pieces) if p not in specials and p not in chars]
    fixed = len(SPECIAL_TOKENS) + num_sentinels + len(char_list)
    if size is None:
        chosen = set(p for p in piece_list if pieces[p] >= min_count)
    elif size < fixed:
        raise ValueError(f"--size {size} is too small: the {len(SPECIAL_TOKENS)} special tokens, {num_sentinels} "
                         f"sentinels and the corpus' {len(char_list)} distinct characters need {fixed}; "
                         f"use --size {fixed} or more")
    else:
        chosen = set(piece_list[:size - fixed])
    chosen.update(char_list)
    content = [unit for unit in _by_frequency(chars + pieces) if unit in chosen]
    sentinels = [f"<s_{i}>" for i in range(num_sentinels)]
    total = len(SPECIAL_TOKENS) + len(content) + num_sentinels
    # An explicit --size is the total the user asked for; padding applies to the corpus-driven size only.
    filler = [] if size is not None else [f"<unused_{i}>" for i in range(-total % max(pad_to_multiple, 1))]
    return SPECIAL_TOKENS + content + filler + sentinels


def _by_frequency(counts: collections.Counter) -> List[str]:
    return sorted(counts, key=lambda unit: (-counts[unit], unit))


def _read_lines(paths: Sequence[pathlib.Path]) -> Iterable[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            yield from f


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="+", required=True, type=pathlib.Path, help="UTF-8 text files")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="the vocab.txt to write")
    parser.add_argument("--size", type=int, default=None,
                        help="total vocab size incl. specials and sentinels (default: every character plus pieces "
                             f"seen at least {DEFAULT_MIN_COUNT} times)")
    parser.add_argument("--num-sentinels", type=int, default=DEFAULT_NUM_SENTINELS)
    parser.add_argument("--pad-to-multiple", type=int, default=8,
                        help="without --size, pad the vocab with <unused_i> tokens to a multiple of this (model-parallel "
                             "sizes must divide the vocab size; default 8 allows MP 1, 2, 4, 8)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.corpus if not p.is_file()]
    if missing:
        parser.error(f"corpus file(s) not found: {', '.join(missing)}")
    if args.num_sentinels < 2:
        parser.error(f"--num-sentinels {args.num_sentinels}: CPM-2 targets need at least <s_0> and <s_1>")
    try:
        tokens = build_vocab(_read_lines(args.corpus), size=args.size, num_sentinels=args.num_sentinels,
                             pad_to_multiple=args.pad_to_multiple)
    except ValueError as err:
        parser.error(str(err))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    print(f"wrote {len(tokens)} tokens to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
