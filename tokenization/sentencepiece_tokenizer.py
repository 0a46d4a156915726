"""`SentencePieceTokenizer`: HF T5-family `spiece.model` behind the CPM-2 tokenizer interface (design.md).

Roles follow the HF T5 convention: pad = the model's pad (also the decoder start token), eod = its eos,
unk = its unk, no mask token, sentinel i = `<extra_id_i>`. A model trained with `<extra_id_i>` as user-defined
symbols holds them itself; HF's released `spiece.model` files do not, and HF appends `extra_ids` (100) of them
after the model's pieces in reverse order (`<extra_id_0>` is the last id); both layouts are handled.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Union

from tokenization import parallel

SENTINEL_FORMAT = "<extra_id_{}>"
_SENTINEL_PATTERN = re.compile(r"(<extra_id_\d+>)")
HF_T5_EXTRA_IDS = 100  # transformers.T5Tokenizer(extra_ids=100)


def file_fingerprint(path: Union[str, "os.PathLike[str]"]) -> str:
    """A short hex digest of a tokenizer file, to key on-disk caches of tokenised data."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class SentencePieceTokenizer:
    """A SentencePiece model with the roles and method names of `EncDecTokenizer`. `encode` adds no EOS."""

    def __init__(self, model_file: Union[str, "os.PathLike[str]"], extra_ids: int = HF_T5_EXTRA_IDS):
        import sentencepiece  # one place; a pinned requirement (requirements.txt)

        self.model_file = str(model_file)
        self.extra_ids = extra_ids
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        self.fingerprint = file_fingerprint(self.model_file)
        self._sp_size = self.sp.get_piece_size()
        for role, value in (("pad", self.sp.pad_id()), ("eos", self.sp.eos_id()), ("unk", self.sp.unk_id())):
            if value < 0:
                raise ValueError(f"{self.model_file} has no {role} piece; a T5-family model needs pad, eos and unk "
                                 f"(train with {role}_id=...)")
        self.sentinel_ids = self._sentinels_in_model()
        # Sentinels appended after the model (HF layout) when the model itself has none.
        self._appended: Dict[str, int] = {}
        if not self.sentinel_ids:
            self._appended = {SENTINEL_FORMAT.format(i): self._sp_size + extra_ids - 1 - i for i in range(extra_ids)}
            self.sentinel_ids = [self._appended[SENTINEL_FORMAT.format(i)] for i in range(extra_ids)]
        self._appended_tokens = {v: k for k, v in self._appended.items()}

    def _sentinels_in_model(self) -> List[int]:
        ids, unk = [], self.sp.unk_id()
        while True:
            token_id = self.sp.piece_to_id(SENTINEL_FORMAT.format(len(ids)))
            if token_id == unk:
                return ids
            ids.append(token_id)

    def __reduce__(self):
        return (type(self), (self.model_file, self.extra_ids))

    # ----------------------------------------------------------------------------------------- roles
    @property
    def vocab_size(self) -> int:
        return self._sp_size + len(self._appended)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def decoder_start_id(self) -> int:
        return self.sp.pad_id()  # HF T5: decoder_start_token_id = pad_token_id

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def eod_id(self) -> int:
        return self.sp.eos_id()

    @property
    def mask_id(self) -> Optional[int]:
        return None

    def get_sentinel_num(self) -> int:
        return len(self.sentinel_ids)

    def get_sentinel_id(self, i: int) -> int:
        if not 0 <= i < len(self.sentinel_ids):
            raise IndexError(f"sentinel {i} does not exist: {self.model_file} has {len(self.sentinel_ids)} sentinels")
        return self.sentinel_ids[i]

    def token_to_id(self, token: str) -> int:
        if token in self._appended:
            return self._appended[token]
        token_id = self.sp.piece_to_id(token)
        if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id):
            raise KeyError(f"token {token!r} is not in the SentencePiece model {self.model_file}")
        return token_id

    # ----------------------------------------------------------------------------------------- text
    def encode(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if not self._appended:
            return self.sp.encode(text, out_type=int)
        ids: List[int] = []
        for part in _SENTINEL_PATTERN.split(text):  # appended sentinels are unknown to the model: split them out
            if part in self._appended:
                ids.append(self._appended[part])
            elif part:
                ids.extend(self.sp.encode(part, out_type=int))
        return ids

    def encode_batch(self, texts: Sequence[str], num_workers: Optional[int] = None) -> List[List[int]]:
        return parallel.encode_batch(self, texts, num_workers)

    def prepare_for_workers(self) -> None:
        """Nothing to preload (the interface of `EncDecTokenizer.prepare_for_workers`)."""

    def tokenize(self, text: str) -> List[str]:
        return self.convert_ids_to_tokens(self.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control pieces (pad, eos) decode to nothing, appended sentinels to `<extra_id_i>`."""
        out: List[str] = []
        run: List[int] = []
        for token_id in (int(i) for i in ids):
            self._check_id(token_id)
            if token_id in self._appended_tokens:
                out.append(self.sp.decode(run))
                out.append(self._appended_tokens[token_id])
                run = []
            else:
                run.append(token_id)
        out.append(self.sp.decode(run))
        return "".join(out)

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> List[int]:
        """Unknown tokens map to unk (as `EncDecTokenizer.convert_tokens_to_ids`)."""
        return [self._appended.get(token, self.sp.piece_to_id(token)) for token in tokens]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> List[str]:
        tokens = []
        for token_id in (int(i) for i in ids):
            self._check_id(token_id)
            tokens.append(self._appended_tokens.get(token_id) or self.sp.id_to_piece(token_id))
        return tokens

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"id {token_id} is outside the vocab of {self.model_file} (0..{self.vocab_size - 1})")
