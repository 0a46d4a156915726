"""CPM-2 tokenizers: `EncDecTokenizer` (bit-exact with the original), `SentencePieceTokenizer`, `load_tokenizer`.

The rules are SPEC §5 / reference/original-toolkit.md §4; the speed design (block and piece caches, bounded
longest match, process-parallel `encode_batch`) is described in docs/tokenizer.md.
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from tokenization import parallel, rules, segment
from tokenization.sentencepiece_tokenizer import SentencePieceTokenizer, file_fingerprint

__all__ = ["EncDecTokenizer", "SentencePieceTokenizer", "load_tokenizer"]

PathLike = Union[str, "os.PathLike[str]"]

# The vocab marks the Chinese-English model by this token (id 7 in bpe_cn_en, which shifts later ids by one).
CN_EN_MARKER = "<go>"
SENTINEL_FORMAT = "<s_{}>"
_REQUIRED_TOKENS = ("<unk>", "<s>", "<pad>", "<eod>")

# Cache sizes: whole texts repeat (label words, templates, re-encoded dev sets); jieba blocks repeat across texts
# (a C3 passage per question); pieces (words) repeat everywhere. Entries are small tuples of ints.
TEXT_CACHE_SIZE = 4096
BLOCK_CACHE_SIZE = 1 << 16
PIECE_CACHE_SIZE = 1 << 17


class EncDecTokenizer:
    """The CPM-2 vocab tokenizer; the Chinese-English rules apply when the vocab holds `<go>`.

    `encode` adds no BOS/EOS. Ids are line numbers of `vocab_file` (lines stripped, as the original read them).
    """

    def __init__(self, vocab_file: PathLike, max_len: Optional[int] = None, max_sentinels: Optional[int] = None):
        self.vocab_file = str(vocab_file)
        self.max_len = max_len if max_len is not None else int(1e12)  # kept from the original's signature; unused
        self.id_to_token = _read_vocab(self.vocab_file)
        # Last occurrence wins for a duplicated token, as in the original's dict built line by line.
        self.vocab: Dict[str, int] = {token: i for i, token in enumerate(self.id_to_token)}
        _check_required(self.vocab, self.vocab_file)
        self.is_wordpiece = CN_EN_MARKER in self.vocab
        self.sentinel_ids = _sentinel_ids(self.vocab, max_sentinels, self.vocab_file)
        self.fingerprint = file_fingerprint(self.vocab_file)
        self._match = rules.LongestMatch(self.vocab, unk_id=self.unk_id, wordpiece=self.is_wordpiece)
        # Which ids count as "English" for the Chinese-English space dropping (original: `en_vocab`).
        self._is_english = [not rules.is_chinese_token(token) for token in self.id_to_token]
        self._space_id = self.vocab.get(rules.SPACE_TOKEN, -1)
        self._build_caches()

    def _build_caches(self) -> None:
        # Per instance (not module-level lru_cache) so two vocabs never share entries.
        self._encode_cached = functools.lru_cache(maxsize=TEXT_CACHE_SIZE)(self._encode_uncached)
        self._block_ids = functools.lru_cache(maxsize=BLOCK_CACHE_SIZE)(self._block_ids_uncached)
        self._piece_ids = functools.lru_cache(maxsize=PIECE_CACHE_SIZE)(self._piece_ids_uncached)

    def clear_caches(self) -> None:
        """Forget every cached text, block and piece (benchmarks measure cold caches)."""
        self._build_caches()

    def __reduce__(self):
        # Pickle as "rebuild from the vocab file": the caches and bound lru wrappers are not worth shipping.
        return (type(self), (self.vocab_file, None, len(self.sentinel_ids)))

    # ----------------------------------------------------------------------------------------- roles
    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def unk_id(self) -> int:
        return self.vocab["<unk>"]

    @property
    def pad_id(self) -> int:
        return self.vocab["<pad>"]

    @property
    def eod_id(self) -> int:
        return self.vocab["<eod>"]

    @property
    def decoder_start_id(self) -> int:
        return self.vocab["<s>"]

    @property
    def mask_id(self) -> Optional[int]:
        return self.vocab.get("<mask>")

    @property
    def pad_token(self) -> str:
        return "<pad>"

    @property
    def eod_token(self) -> str:
        return "<eod>"

    def get_sentinel_num(self) -> int:
        return len(self.sentinel_ids)

    def get_sentinel_id(self, i: int) -> int:
        if not 0 <= i < len(self.sentinel_ids):
            raise IndexError(f"sentinel {i} does not exist: {self.vocab_file} has <s_0>..<s_{len(self.sentinel_ids) - 1}>")
        return self.sentinel_ids[i]

    def token_to_id(self, token: str) -> int:
        """The id of `token`; KeyError naming it when absent (look template and label words up, never hard-code)."""
        try:
            return self.vocab[token]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the vocab {self.vocab_file}") from None

    # ----------------------------------------------------------------------------------------- encode
    def encode(self, text: str) -> List[int]:
        """Token ids of `text` (no BOS/EOS), exactly as the original tokenizer of this vocab produced them."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self._encode_cached(text))

    def encode_batch(self, texts: Sequence[str], num_workers: Optional[int] = None) -> List[List[int]]:
        """`[encode(t) for t in texts]`, over `num_workers` processes (None = all CPUs) when the input is large."""
        return parallel.encode_batch(self, texts, num_workers)

    def prepare_for_workers(self) -> None:
        """Load jieba now, so forked `encode_batch` workers inherit it instead of each loading it again."""
        segment.ensure_jieba()

    def tokenize(self, text: str) -> List[str]:
        """The original's `tokenize`: jieba + longest match only (no full-width folding, no space dropping)."""
        return self.convert_ids_to_tokens(self._segment_ids(text))

    def _encode_uncached(self, text: str) -> Tuple[int, ...]:
        if self.is_wordpiece:
            ids = self._segment_ids(text)
            return tuple(rules.drop_spaces_between_english(ids, space_id=self._space_id, is_english=self._is_english))
        return tuple(self._segment_ids(rules.fold_full_width(text)))

    def _segment_ids(self, text: str) -> List[int]:
        segment.ensure_jieba()
        ids: List[int] = []
        for block in segment.split_blocks(text):
            ids.extend(self._block_ids(block))
        return ids

    def _block_ids_uncached(self, block: str) -> Tuple[int, ...]:
        ids: List[int] = []
        for piece in segment.cut_block(block):
            ids.extend(self._piece_ids(piece.translate(rules.PIECE_TRANSLATION)))
        return tuple(ids)

    def _piece_ids_uncached(self, piece: str) -> Tuple[int, ...]:
        return tuple(self._match(piece))

    # ----------------------------------------------------------------------------------------- decode
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens come out literally (e.g. "<unk>"), as in the original."""
        tokens = self.convert_ids_to_tokens(ids)
        if self.is_wordpiece:
            return rules.join_tokens_wordpiece(tokens)
        return rules.join_tokens_chinese(tokens)

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> List[int]:
        """Ids of `tokens`; an unknown token maps to `<unk>` (the original's behaviour)."""
        unk = self.unk_id
        return [self.vocab.get(token, unk) for token in tokens]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> List[str]:
        table, n = self.id_to_token, len(self.id_to_token)
        tokens = []
        for token_id in ids:
            index = int(token_id)
            if not 0 <= index < n:
                raise ValueError(f"id {index} is outside the vocab {self.vocab_file} (0..{n - 1})")
            tokens.append(table[index])
        return tokens


# --------------------------------------------------------------------------------------------- helpers
def _read_vocab(vocab_file: str) -> List[str]:
    # One token per line, stripped (the original `load_vocab`); a missing final newline makes no difference.
    with open(vocab_file, encoding="utf-8") as f:
        return [line.strip() for line in f]


def _check_required(vocab: Dict[str, int], vocab_file: str) -> None:
    missing = [token for token in _REQUIRED_TOKENS if token not in vocab]
    if missing:
        raise ValueError(f"{vocab_file} lacks the special tokens {missing}; a CPM-2 vocab starts with "
                         "<unk> <s> </s> ▃ <sep> <pad> <mask> <eod> (tools/build_vocab.py writes one)")


def _sentinel_ids(vocab: Dict[str, int], wanted: Optional[int], vocab_file: str) -> List[int]:
    """Ids of <s_0>, <s_1>, ... (the consecutive run present; 190 in bpe_cn, 185 in bpe_cn_en)."""
    ids = []
    while SENTINEL_FORMAT.format(len(ids)) in vocab:
        ids.append(vocab[SENTINEL_FORMAT.format(len(ids))])
    if wanted is not None:
        if len(ids) < wanted:
            raise ValueError(f"max_sentinels={wanted} but {vocab_file} has only {len(ids)} sentinels <s_i>")
        ids = ids[:wanted]
    return ids


def load_tokenizer(path: PathLike) -> Union[EncDecTokenizer, SentencePieceTokenizer]:
    """A tokenizer from a folder holding `vocab.txt` (or an HF T5 `spiece.model`), a vocab file or a `.model` file."""
    p = pathlib.Path(path)
    if p.is_dir():
        for name in ("vocab.txt", "spiece.model"):
            if (p / name).is_file():
                return load_tokenizer(p / name)
        raise FileNotFoundError(f"tokenizer folder {p} holds neither vocab.txt nor spiece.model; "
                                "pass the vocab file or the SentencePiece .model file itself")
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {p} does not exist (expected a folder with vocab.txt, "
                                "a vocab.txt file or a SentencePiece .model file)")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".txt":
        return EncDecTokenizer(p)
    raise ValueError(f"tokenizer path {p} is neither a vocab .txt file nor a SentencePiece .model file")

