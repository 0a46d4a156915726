"""The CPM-2 tokenisation rules as small pure pieces (SPEC §5, reference/original-toolkit.md §4).

Everything here reproduces the original `tokenization_enc_dec.py` (Chinese vocab) and
`tokenization_enc_dec_encn.py` (Chinese-English vocab, selected by `<go>` in the vocab) bit for bit; only the
data structures are faster. `tokenization_enc_dec.EncDecTokenizer` wires them together with caches.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence

UNK_TOKEN = "<unk>"
SPACE_TOKEN = "\u2582"  # ▂ stands for " " inside the vocab
NEWLINE_TOKEN = "\u2583"  # ▃ stands for "\n"
CONTINUATION = "##"  # WordPiece prefix of non-initial English sub-pieces (Chinese-English vocab only)

# The original `WordpieceTokenizer(max_input_chars_per_word=200)`: a longer jieba piece is one <unk>.
MAX_PIECE_CHARS = 200

# Q2B of the original: these full-width marks are real tokens of the vocab, so they are kept.
KEPT_FULL_WIDTH = "，。！（）？、；："

# Space and newline are spelled as ▂ / ▃ in the vocab (the original's `str.maketrans(" \n", "▂▃")`).
PIECE_TRANSLATION = str.maketrans(" \n", SPACE_TOKEN + NEWLINE_TOKEN)

# The original's `is_contain_chinese` looks only at the CJK Unified Ideographs block U+4E00..U+9FFF.
_CHINESE_CHAR = re.compile("[\u4e00-\u9fff]")


def _full_to_half_table() -> Dict[int, int]:
    # U+FF01..U+FF5E sit 0xFEE0 above ASCII 0x21..0x7E; U+3000 (ideographic space) becomes a plain space.
    table = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F) if chr(code) not in KEPT_FULL_WIDTH}
    table[0x3000] = 0x20
    return table


FULL_TO_HALF = _full_to_half_table()


def fold_full_width(text: str) -> str:
    """The original `Q2B` applied to every character (Chinese vocab only)."""
    return text.translate(FULL_TO_HALF)


def is_chinese_token(token: str) -> bool:
    """The original `is_contain_chinese`: any char in U+4E00..U+9FFF, or exactly the space token ▂."""
    return token == SPACE_TOKEN or _CHINESE_CHAR.search(token) is not None


class LongestMatch:
    """Greedy longest-match-first segmentation of one jieba piece into vocab ids.

    Equal to the original `WordpieceTokenizer.tokenize`, which tried every end position from the end of the
    piece down, joining a character list each time (quadratic per piece). No vocab token is longer than
    `max_len` characters, so trying ends beyond `start + max_len` can never match: the result is the same
    with far fewer lookups, and each lookup is one dict probe of a string slice.
    """

    def __init__(self, vocab: Dict[str, int], *, unk_id: int, wordpiece: bool) -> None:
        self.vocab = vocab
        self.unk_id = unk_id
        # wordpiece=True is the Chinese-English rule: a non-Chinese substring that does not start the piece is
        # looked up as "##" + substring.
        self.wordpiece = wordpiece
        # An upper bound is enough for exactness ("##"-prefixed tokens only make it looser).
        self.max_len = max((len(t) for t in vocab), default=1)

    def __call__(self, piece: str) -> List[int]:
        n = len(piece)
        if n > MAX_PIECE_CHARS:
            return [self.unk_id]
        vocab, ids, start = self.vocab, [], 0
        while start < n:
            for end in range(min(n, start + self.max_len), start, -1):
                token_id = vocab.get(self._key(piece[start:end], start))
                if token_id is not None:
                    ids.append(token_id)
                    start = end
                    break
            else:
                ids.append(self.unk_id)  # no prefix of the rest matches: this one character is unknown
                start += 1
        return ids

    def _key(self, substr: str, start: int) -> str:
        if not self.wordpiece or start == 0 or is_chinese_token(substr):
            return substr
        return CONTINUATION + substr


def drop_spaces_between_english(ids: List[int], *, space_id: int, is_english: Sequence[bool]) -> List[int]:
    """Chinese-English encode: drop a ▂ whose two neighbours (in the undropped list) are both non-Chinese.

    The original kept ids[0] and ids[-1] unconditionally and filtered ids[1:-1]; for a one-token text that
    appended the same token twice (相似 -> [2947, 2947]). That bug is not reproduced: a one-token list is
    returned once.
    """
    if len(ids) <= 2:
        return list(ids)
    kept = [ids[0]]
    for i in range(1, len(ids) - 1):
        if ids[i] == space_id and is_english[ids[i - 1]] and is_english[ids[i + 1]]:
            continue
        kept.append(ids[i])
    kept.append(ids[-1])
    return kept


def join_tokens_chinese(tokens: Sequence[str]) -> str:
    """Chinese-vocab decode: plain concatenation, then ▂ -> space and ▃ -> newline."""
    return _unescape("".join(tokens))


def join_tokens_wordpiece(tokens: Sequence[str]) -> str:
    """Chinese-English decode: glue "##" pieces, then put a space between two adjacent non-Chinese tokens.

    So "CPM-2" comes back as "CPM - 2" (the original's behaviour, kept for bit-exactness).
    """
    if not tokens:
        return ""
    words = [tokens[0]]
    for token in tokens[1:]:
        if token.startswith(CONTINUATION):
            words[-1] += token[len(CONTINUATION):]
        else:
            words.append(token)
    out = []
    for left, right in zip(words, words[1:]):
        out.append(left)
        if not is_chinese_token(left) and not is_chinese_token(right):
            out.append(SPACE_TOKEN)
    out.append(words[-1])
    return _unescape("".join(out))


def _unescape(text: str) -> str:
    return text.replace(SPACE_TOKEN, " ").replace(NEWLINE_TOKEN, "\n")
