"""The one reader of JSON-lines data files (corpora, canonical examples, gate corpora).

Below both ``train_edits`` and ``serve`` in the layout, so both read JSONL the same way: gzip-aware
(``.gz``), blank lines skipped, and every malformed line a :class:`DataError` naming file, line and field.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class DataError(ValueError):
    """A malformed data file or record; the message names file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


def open_text(path: Path) -> IO[str]:
    """A UTF-8 text handle on ``path``, decompressed when the name ends in ``.gz``."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a JSONL file; each record is a JSON object."""
    path = Path(path)
    with open_text(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(path, lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(path, lineno, None, f"expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec
