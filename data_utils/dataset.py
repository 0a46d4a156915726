"""Tokenise a task split once (with an on-disk cache) and pad batches dynamically.

``TaskDataset`` reads raw examples through ``task.read_split``, encodes each with ``task.encode`` (the layout in
docs/design.md), cuts over-long inputs with a logged count, and keeps the result in a column store (flat int
tensors plus offsets) so that millions of examples neither cost a Python list per token nor get copied into
every DataLoader worker by reference counting. ``collate`` pads one batch to its own longest sequence (the
original padded every batch to the split's maximum, ``reference/original-toolkit.md`` §5.1).

The cache file is written with ``torch.save`` and read with ``torch.load(weights_only=True)``: only tensors,
strings, numbers, lists and dicts, never arbitrary pickled objects.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from data_utils.collate import collate, make_collate, make_prompt_mask_fn  # noqa: F401  (re-exported API)

logger = logging.getLogger(__name__)

__all__ = ["TaskDataset", "collate", "make_collate", "make_prompt_mask_fn", "cache_key"]

CACHE_FORMAT = 1  # bump when the stored layout changes; old files are then ignored (different key)
CACHE_DIR_NAME = ".cpm2_cache"
_INT32 = (-(2**31), 2**31 - 1)


# --------------------------------------------------------------------------------------------------------------
# Column store: list[dict] <-> {name: column}; int lists become one flat tensor plus offsets
# --------------------------------------------------------------------------------------------------------------


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _flat(lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate int lists: values [sum of lengths] (int32 when it fits, else int64) and offsets [n + 1]."""
    lengths = torch.tensor([len(x) for x in lists], dtype=torch.int64)
    offsets = torch.zeros(len(lists) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    flat = [v for x in lists for v in x]
    fits = not flat or (_INT32[0] <= min(flat) and max(flat) <= _INT32[1])
    return torch.tensor(flat, dtype=torch.int32 if fits else torch.int64), offsets


def _to_columns(examples: list[dict]) -> dict[str, dict]:
    keys: dict[str, None] = {}
    for example in examples:
        keys.update(dict.fromkeys(example))
    columns: dict[str, dict] = {}
    for key in keys:
        values = [example.get(key) for example in examples]  # a key some examples lack reads back as None
        if values and all(_is_int_list(v) for v in values):
            flat, offsets = _flat(values)
            columns[key] = {"kind": "ints", "values": flat, "offsets": offsets}
        elif values and all(isinstance(v, list) and all(_is_int_list(g) for g in v) for v in values):
            groups = [g for v in values for g in v]  # rank tasks: group_enc_ids = list of id lists
            flat, offsets = _flat(groups)
            group_offsets = torch.tensor([0] + [len(v) for v in values], dtype=torch.int64).cumsum(0)
            columns[key] = {"kind": "ints2", "values": flat, "offsets": offsets, "group_offsets": group_offsets}
        else:
            columns[key] = {"kind": "objects", "values": values}
    return columns


def _row(columns: dict[str, dict], i: int) -> dict:
    row: dict[str, Any] = {}
    for key, column in columns.items():
        if column["kind"] == "ints":
            offsets = column["offsets"]
            row[key] = column["values"][offsets[i] : offsets[i + 1]].tolist()
        elif column["kind"] == "ints2":
            g0, g1 = column["group_offsets"][i].item(), column["group_offsets"][i + 1].item()
            offsets, values = column["offsets"], column["values"]
            row[key] = [values[offsets[g] : offsets[g + 1]].tolist() for g in range(g0, g1)]
        else:
            row[key] = column["values"][i]
    return row


# --------------------------------------------------------------------------------------------------------------
# Cache key and files
# --------------------------------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prompt_json(prompt: Any) -> Any:
    """A JSON-able view of the prompt config (dict, dataclass, object with ``to_dict``, or None)."""
    if prompt is None or isinstance(prompt, (dict, list, str, int, float, bool)):
        return prompt
    if hasattr(prompt, "to_dict"):
        return prompt.to_dict()
    if dataclasses.is_dataclass(prompt):
        return dataclasses.asdict(prompt)
    return repr(prompt)


def _task_source_digest(task: Any) -> str:
    """Digest of the source files behind ``task.encode``: the modules of the task class and its bases, and the
    modules of the same top-level package they import from (``data_utils.prompt``, ...). Editing a template or
    a prompt layout thus invalidates the caches instead of serving stale ids."""
    module_names: set[str] = set()
    for klass in type(task).__mro__:
        if klass.__module__ == "builtins":
            continue
        module_names.add(klass.__module__)
        package = klass.__module__.split(".")[0]
        module = sys.modules.get(klass.__module__)
        for value in vars(module).values() if module is not None else ():
            owner = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(owner, str) and owner.split(".")[0] == package:
                module_names.add(owner)
    digest = hashlib.sha256()
    for name in sorted(module_names):
        source_file = getattr(sys.modules.get(name), "__file__", None)
        if source_file and os.path.isfile(source_file):
            digest.update(name.encode("utf-8") + Path(source_file).read_bytes())
    return digest.hexdigest()


def cache_key(*, data_files: Sequence[Path], tokenizer_fingerprint: str, task: Any, split: str, prompt: Any,
              max_enc_len: Optional[int], max_dec_len: Optional[int], skip_bad_lines: bool) -> str:
    """sha256 over everything that changes the encoded examples (see ``TaskDataset``)."""
    parts = {
        "format": CACHE_FORMAT,
        "data": [[p.name, _file_sha256(p)] for p in data_files],
        "tokenizer": tokenizer_fingerprint,
        "task": getattr(task, "name", type(task).__name__),
        "task_source": _task_source_digest(task),
        "split": split,
        "prompt": _prompt_json(prompt),
        "max_enc_len": max_enc_len,
        "max_dec_len": max_dec_len,
        "skip_bad_lines": skip_bad_lines,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode("utf-8")).hexdigest()


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same folder, then ``os.replace``: readers never see a half-written cache."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------------------


class TaskDataset:
    """The encoded examples of one split of one task; ``dataset[i]`` is ``task.encode``'s dict plus ``index``.

    Args:
        task: a ``data_utils.tasks`` Task (``read_split``, ``encode``, ``name``, ``kind``).
        tokenizer: roles per docs/design.md; ``fingerprint`` keys the cache (no cache without it, with a warning).
        data_path, split, ext: passed to ``task.read_split`` (``split_files`` names the files hashed for the key).
        prompt: the prompt config handed to ``task.encode`` (None for full fine-tuning).
        max_enc_len: encoder ids (each group member for rank tasks) are cut to this many tokens; the task also
            receives it so it can cut the passage rather than the tail. The count is logged.
        max_dec_len: answer ids are cut to this many tokens (decoder length is then at most max_dec_len + 1);
            a generation target keeps its final ``<s_1>`` so the model still learns to stop.
        cache_dir: folder for the cache (default ``<data dir>/.cpm2_cache/``, or a temp folder when that is not
            writable). The key is the sha256 of the data files' bytes, the tokenizer fingerprint, the task name and
            source, the split, the prompt config JSON, the max lengths and ``skip_bad_lines``.
        ratio, num: keep the first ``int(len * ratio)`` and then at most the first ``num`` examples (the
            original's ``--train-ratio`` / ``--train-num``, prefix subsampling). The cache holds the full split.

    Several ranks may build the same cache at once: each writes its own temp file and ``os.replace`` is atomic,
    so the result is one valid file. Building on rank 0 first and then barrier-ing saves the duplicate work.
    """

    def __init__(self, task: Any, tokenizer: Any, data_path: str | os.PathLike, split: str, ext: Optional[str],
                 *, prompt: Any = None, max_enc_len: Optional[int] = None, max_dec_len: Optional[int] = None,
                 cache_dir: Optional[str | os.PathLike] = None, skip_bad_lines: bool = False,
                 ratio: Optional[float] = None, num: Optional[int] = None):
        for name, value in (("max_enc_len", max_enc_len), ("max_dec_len", max_dec_len), ("num", num)):
            if value is not None and value < 1:
                raise ValueError(f"TaskDataset: {name}={value} must be >= 1 or None")
        if ratio is not None and not 0.0 < ratio <= 1.0:
            raise ValueError(f"TaskDataset: ratio={ratio} must lie in (0, 1] (--train-ratio)")
        self.task, self.tokenizer = task, tokenizer
        self.data_path, self.split, self.ext = Path(data_path), split, ext
        self.prompt, self.max_enc_len, self.max_dec_len = prompt, max_enc_len, max_dec_len
        self.skip_bad_lines = skip_bad_lines
        self._raw: Optional[list[dict]] = None
        self.cache_path: Optional[Path] = None
        self.cache_hit = False

        data_files = self._data_files()
        fingerprint = getattr(tokenizer, "fingerprint", None)
        if fingerprint is None:
            logger.warning("tokenizer has no `fingerprint`: the tokenised %s data will not be cached", split)
            columns, total = self._build()
        else:
            key = cache_key(data_files=data_files, tokenizer_fingerprint=fingerprint, task=task, split=split,
                            prompt=prompt, max_enc_len=max_enc_len, max_dec_len=max_dec_len,
                            skip_bad_lines=skip_bad_lines)
            folder = self._cache_folder(cache_dir, data_files)
            self.cache_path = folder / f"{getattr(task, 'name', 'task')}-{split}-{key[:24]}.pt"
            loaded = self._load_cache(self.cache_path, key)
            if loaded is not None:
                columns, total = loaded
                self.cache_hit = True
                logger.info("%s %s: %d tokenised examples from cache %s", getattr(task, "name", "task"), split,
                            total, self.cache_path)
            else:
                columns, total = self._build()
                _atomic_torch_save({"format": CACHE_FORMAT, "key": key, "n": total, "columns": columns},
                                   self.cache_path)
        self._columns = columns
        self._total = total
        self._n = self._subsample_length(total, ratio, num)

    # ---- construction helpers --------------------------------------------------------------------------------

    def _data_files(self) -> list[Path]:
        split_files = getattr(self.task, "split_files", None)
        if split_files is not None:
            return list(split_files(self.data_path, self.split, self.ext))
        if self.data_path.is_file():
            return [self.data_path]
        return [self.data_path / f"{self.split}{self.ext or ''}"]

    def _cache_folder(self, cache_dir: Optional[str | os.PathLike], data_files: list[Path]) -> Path:
        if cache_dir is not None:
            folder = Path(cache_dir)
            if not _writable_dir(folder):
                raise ValueError(f"cache_dir {folder} is not writable; give a writable folder or leave it unset")
            return folder
        folder = data_files[0].parent / CACHE_DIR_NAME
        if _writable_dir(folder):
            return folder
        fallback = Path(tempfile.gettempdir()) / "cpm2_cache"
        logger.warning("%s is not writable; caching tokenised data in %s instead", folder, fallback)
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback

    @staticmethod
    def _load_cache(path: Path, key: str) -> Optional[tuple[dict, int]]:
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, weights_only=True)
            if blob.get("format") != CACHE_FORMAT or blob.get("key") != key:
                raise ValueError("key mismatch")
            return blob["columns"], int(blob["n"])
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, pickle.UnpicklingError) as err:
            logger.warning("ignoring unreadable cache %s (%s); tokenising again", path, err)
            return None

    def _read_raw(self) -> list[dict]:
        if self._raw is None:
            self._raw = self.task.read_split(self.data_path, self.split, self.ext,
                                             skip_bad_lines=self.skip_bad_lines)
        return self._raw

    def _build(self) -> tuple[dict, int]:
        started = time.perf_counter()
        raws = self._read_raw()
        encoded, enc_cut, at_limit, dec_cut = [], 0, 0, 0
        for raw in raws:
            example = self.task.encode(raw, self.tokenizer, prompt=self.prompt, max_enc_len=self.max_enc_len)
            cut = self._truncate_encoder(example)
            enc_cut += cut
            at_limit += not cut and self._longest_encoder(example) == self.max_enc_len
            dec_cut += self._truncate_answer(example)
            encoded.append(example)
        name = getattr(self.task, "name", "task")
        if self.max_enc_len is not None:
            # A task that cuts inside encode (to keep trailing template tokens) hides the original length; such
            # inputs end exactly at the limit, so they are reported separately rather than guessed.
            logger.info("%s %s: %d of %d encoder inputs truncated to %d tokens (%d more are exactly %d long: "
                        "cut inside task.encode or that long already)", name, self.split, enc_cut, len(encoded),
                        self.max_enc_len, at_limit, self.max_enc_len)
        if self.max_dec_len is not None:
            logger.info("%s %s: %d of %d answers truncated to %d tokens", name, self.split, dec_cut, len(encoded),
                        self.max_dec_len)
        logger.info("%s %s: tokenised %d examples in %.1fs", name, self.split, len(encoded),
                    time.perf_counter() - started)
        return _to_columns(encoded), len(encoded)

    def _truncate_encoder(self, example: dict) -> bool:
        """Cut encoder ids to max_enc_len; True when this example was cut here or reported cut by the task.

        A task that shortens the passage itself (``truncate_body``) may set ``enc_truncated: True`` so that the
        logged count includes it; otherwise only cuts made here are counted.
        """
        cut = bool(example.pop("enc_truncated", False))
        limit = self.max_enc_len
        if limit is None:
            return cut
        if "group_enc_ids" in example:
            groups = example["group_enc_ids"]
            cut = cut or any(len(g) > limit for g in groups)
            example["group_enc_ids"] = [g[:limit] for g in groups]
        elif len(example["enc_ids"]) > limit:
            example["enc_ids"] = example["enc_ids"][:limit]
            cut = True
        return cut

    @staticmethod
    def _longest_encoder(example: dict) -> int:
        if "group_enc_ids" in example:
            return max((len(g) for g in example["group_enc_ids"]), default=0)
        return len(example["enc_ids"])

    def _truncate_answer(self, example: dict) -> bool:
        answer = example.get("answer_ids")
        if self.max_dec_len is None or answer is None or len(answer) <= self.max_dec_len:
            return False
        if getattr(self.task, "kind", None) == "generate" and answer[-1] == self.tokenizer.get_sentinel_id(1):
            example["answer_ids"] = answer[: self.max_dec_len - 1] + [answer[-1]]  # keep the stop token
        else:
            example["answer_ids"] = answer[: self.max_dec_len]
        return True

    @staticmethod
    def _subsample_length(total: int, ratio: Optional[float], num: Optional[int]) -> int:
        n = total if ratio is None else int(total * ratio)
        return n if num is None else min(n, num)

    # ---- access ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} examples")
        i = i % self._n
        row = _row(self._columns, i)
        row["index"] = i  # collate turns it into `index [B]` so eval can map outputs back to examples
        return row

    def raw(self, i: int) -> dict:
        """The raw example ``i`` as ``task.read_split`` returned it (read lazily after a cache hit)."""
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} examples")
        raws = self._read_raw()
        if len(raws) != self._total:
            raise RuntimeError(f"{self.data_path} now gives {len(raws)} {self.split} examples but the cache holds "
                               f"{self._total}; the data changed while running")
        return raws[i]

    def lengths(self) -> list[int]:
        """Encoder length of every kept example (longest group member for rank tasks), e.g. for bucketing."""
        column = self._columns.get("enc_ids") or self._columns["group_enc_ids"]
        if column["kind"] == "ints":
            return (column["offsets"][1:] - column["offsets"][:-1])[: self._n].tolist()
        sizes = column["offsets"][1:] - column["offsets"][:-1]
        bounds = column["group_offsets"].tolist()
        return [int(sizes[bounds[i]:bounds[i + 1]].max()) if bounds[i + 1] > bounds[i] else 0
                for i in range(self._n)]
