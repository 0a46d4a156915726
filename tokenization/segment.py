"""jieba pre-tokenisation, split into independently cacheable blocks.

The original called `jieba.cut(text, cut_all=False)` on the whole text. jieba 0.42.1 itself first splits the
text with `jieba.re_han_default` into alternating "han" blocks (CJK, ASCII letters, digits, `+#&._%-`) and other
blocks, and segments each block on its own: nothing carries over from one block to the next. So

    jieba.cut(text) == chain(jieba.cut(block) for block in re_han_default.split(text) if block)

holds exactly, and a block is the natural unit to cache: in C3 every question repeats its passage, whose
sentences are blocks already seen. (`tests/test_tokenization_reference.py` checks the identity on real text.)
"""
from __future__ import annotations

import logging
import threading
from typing import List

import jieba

# Silence jieba's start-up lines ("Building prefix dict ...", "Loading model cost ...") whichever call loads it.
jieba.setLogLevel(logging.WARNING)

_init_lock = threading.Lock()
_initialised = False


def ensure_jieba() -> None:
    """Load jieba's dictionary once, without its start-up log lines.

    jieba writes its model cache to `tempfile.gettempdir()` by default (a writable temp dir), so it is left as is.
    """
    global _initialised
    if _initialised:
        return
    with _init_lock:
        if not _initialised:
            jieba.initialize()
            _initialised = True


def split_blocks(text: str) -> List[str]:
    """The blocks jieba would segment independently, in order (empty strings dropped)."""
    return [block for block in jieba.re_han_default.split(text) if block]


def cut_block(block: str) -> List[str]:
    """jieba's pieces of one block; the same pieces `jieba.cut` yields for this block inside any text."""
    return list(jieba.cut(block, cut_all=False))


def cut_text(text: str) -> List[str]:
    """The original's call, unchanged (used by the block-identity test)."""
    ensure_jieba()
    return list(jieba.cut(text, cut_all=False))
