"""Reading data files for the task readers: the bad-line policy, UTF-8 lines, JSON values with ``file:line:``
errors, TSV rows, and the typed field getters every reader uses (split out of ``base.py``, which keeps the Task
classes; ``base`` re-exports these names)."""
from __future__ import annotations

import bisect
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from data_utils.errors import DataError

logger = logging.getLogger("data_utils.tasks.base")

PathLike = Union[str, "os.PathLike[str]"]




class BadLines:
    """The bad-line policy for one file: raise the first error, or (``--skip-bad-lines``) count and skip."""

    def __init__(self, path: PathLike, *, skip: bool) -> None:
        self.path = Path(path)
        self.skip = skip
        self.skipped: list[DataError] = []

    def handle(self, error: DataError, line: Optional[int] = None) -> None:
        located = error.at(self.path, line)
        if not self.skip:
            raise located
        self.skipped.append(located)


def read_lines(path: Path, bad: BadLines) -> list[str]:
    """The file's lines (index 0 = line 1), decoded as strict UTF-8.

    A line that is not UTF-8 is a bad line; with skipping it becomes "" so that later line numbers stay right.
    An empty file is always an error (skipping cannot make it useful).
    """
    data = path.read_bytes()
    if not data.strip():
        raise DataError("the file is empty; expected data for this split", file=path)
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM written by some editors
        data = data[3:]
    lines: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.handle(
                DataError(
                    f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "convert the file to UTF-8 (e.g. iconv -f gbk -t utf-8)"
                ),
                number,
            )
            text = ""
        lines.append(text[:-1] if text.endswith("\r") else text)
    return lines


class _LineIndex:
    """Maps a character offset of the joined text back to a 1-based line number."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.starts = []
        offset = 0
        for line in lines:
            self.starts.append(offset)
            offset += len(line) + 1

    def line_of(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def iter_json_values(path: Path, bad: BadLines) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, value)`` for each record of a JSON file, whatever its shape:

    * a JSON list (C3, Math23K, WMT): each item, with the line it starts on;
    * JSON lines, or concatenated (pretty-printed) JSON objects such as the public ``Math_23K.json``.

    A syntax error inside a JSON list cannot be skipped (the rest of the list cannot be found reliably);
    in a stream the reader skips to the next line.
    """
    lines = read_lines(path, bad)
    text = "\n".join(lines)
    index = _LineIndex(lines)
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)

    def syntax_error(err: json.JSONDecodeError, start: int) -> DataError:
        if _skip_space(text, err.pos) >= len(text):
            return DataError("truncated JSON: the file ends inside this record")
        where = f" (at line {err.lineno}, column {err.colno})" if err.lineno != index.line_of(start) else ""
        return DataError(f"invalid JSON: {err.msg}{where}")

    if text.startswith("[", pos):
        pos += 1
        while True:
            pos = _skip_space(text, pos)
            if pos >= len(text):
                raise DataError("truncated JSON: the top-level list is never closed with ']'", file=path,
                                line=len(lines))
            if text[pos] == "]":
                break
            start_line = index.line_of(pos)
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise syntax_error(err, pos).at(path, start_line) from None
            yield start_line, value
            pos = _skip_space(text, pos)
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif pos < len(text) and text[pos] != "]":
                raise DataError(f"invalid JSON: expected ',' or ']' after an item, got {text[pos]!r}",
                                file=path, line=index.line_of(pos))
        rest = _skip_space(text, pos + 1)
        if rest < len(text):
            raise DataError("invalid JSON: extra data after the top-level list", file=path, line=index.line_of(rest))
        return

    while pos < len(text):
        start_line = index.line_of(pos)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            bad.handle(syntax_error(err, pos), start_line)
            # resume at the next line (JSON lines: the next record)
            pos = index.starts[start_line] if start_line < len(index.starts) else len(text)
        else:
            yield start_line, value
        pos = _skip_space(text, pos)


def iter_tsv_rows(path: Path, bad: BadLines) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line, columns)`` for each non-blank line of a tab-separated file."""
    for number, line in enumerate(read_lines(path, bad), start=1):
        if line.strip():
            yield number, line.split("\t")


def first_non_space_char(path: Path) -> str:
    """The first non-whitespace character of a file ('' if none): enough to tell JSON from TSV or XML."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("latin-1")


# --------------------------------------------------------------------------------------------------------------
# Field checks (raise DataError naming the field; the reader loop adds file:line)
# --------------------------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def as_object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__} {_show(value)}")
    return value


def get_str(obj: Mapping, name: str, *, optional: bool = False) -> Optional[str]:
    """``obj[name]`` as a string; missing fields raise unless ``optional`` (then None)."""
    if name not in obj:
        if optional:
            return None
        raise DataError("missing field", field=name)
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {type(value).__name__} {_show(value)}", field=name)
    return value


def get_str_list(obj: Mapping, name: str, *, optional: bool = False, min_len: int = 0) -> Optional[list[str]]:
    if name not in obj:
        if optional:
            return None
        raise DataError("missing field", field=name)
    value = obj[name]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(f"must be a list of strings, got {_show(value)}", field=name)
    if len(value) < min_len:
        raise DataError(f"must hold at least {min_len} strings, got {len(value)}", field=name)
    return value


def get_label(obj: Mapping, name: str, allowed: Sequence[Any], *, optional: bool) -> Optional[int]:
    """The index in ``allowed`` of ``obj[name]`` (ints and their string spellings both accepted).

    ``optional``: a missing label gives None (an unlabelled test set); a label outside the set is always an error.
    """
    if name not in obj or obj[name] is None:
        if optional:
            return None
        raise DataError("missing label field (train and dev files must be labelled)", field=name)
    value = obj[name]
    if isinstance(value, bool):  # bool is an int subclass; True is not a valid label
        raise DataError(f"must be one of {list(allowed)}, got {_show(value)}", field=name)
    for index, label in enumerate(allowed):
        if value == label or (isinstance(value, str) and value.strip() == str(label)):
            return index
    raise DataError(f"must be one of {list(allowed)}, got {_show(value)}", field=name)
