"""The error every data reader raises for a problem in a user's data file.

A message always starts with ``file:line:`` (when the line is known) and names the field, so a user can open the
file at that line and fix it: ``data/dev.jsonl:17: field 'label': must be one of [0, 1], got 2``.
"""
from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class DataError(ValueError):
    """A data file problem, carrying where it is (``file``, ``line``) and what is wrong (``field``, ``reason``).

    Readers build it without a location while checking one record and attach the location with :meth:`at`
    in the loop that knows the file and line.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: Optional[PathLike] = None,
        line: Optional[int] = None,
        field: Optional[str] = None,
    ) -> None:
        self.reason = reason
        self.file = os.fspath(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        what = f"field {self.field!r}: " if self.field is not None else ""
        return f"{where}{what}{self.reason}"

    def __reduce__(self):  # keep file / line / field across pickling (DataLoader workers, multiprocessing)
        return _rebuild, (self.reason, self.file, self.line, self.field)

    def at(self, file: PathLike, line: Optional[int]) -> "DataError":
        """The same error located at ``file:line`` (keeps a location that is already set)."""
        return DataError(
            self.reason,
            file=self.file if self.file is not None else file,
            line=self.line if self.line is not None else line,
            field=self.field,
        )


def _rebuild(reason: str, file: Optional[str], line: Optional[int], field: Optional[str]) -> DataError:
    return DataError(reason, file=file, line=line, field=field)
