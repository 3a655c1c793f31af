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


MAX_RECORD_CHARS = 2_000_000  # a longer line is refused unread (parsing and tokenising cost ~300x its size in memory)


def _open_bytes(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]  # a GzipFile is a binary IO
    return path.open("rb")


def _lines(fh: IO[bytes], path: Path, max_chars: int) -> Iterator[tuple[int, str]]:
    """(line number, line) with no line held beyond `max_chars` characters: a longer one is a DataError
    raised after reading at most 4·max_chars bytes of it (UTF-8), never the whole line. Each line is
    decoded on its own, so a byte that is not UTF-8 is reported on its own line."""
    lineno = 0
    cap = 4 * max_chars + 1  # a character is at most 4 bytes of UTF-8
    while True:
        lineno += 1
        raw = fh.readline(cap)
        if not raw:
            return
        if len(raw) > max_chars and (len(raw) >= cap and not raw.endswith(b"\n")):
            raise DataError(path, lineno, None, f"record longer than {max_chars} characters (the limit)")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(path, lineno, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if len(line.rstrip("\n")) > max_chars:
            raise DataError(path, lineno, None, f"record longer than {max_chars} characters (the limit)")
        yield lineno, line


def iter_jsonl(path: str | Path, max_chars: int = MAX_RECORD_CHARS) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a JSONL file; each record is a JSON object of at most
    `max_chars` characters (checked while streaming, before parsing)."""
    path = Path(path)
    with _open_bytes(path) as fh:
        for lineno, raw in _lines(fh, path, max_chars):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(path, lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits, deep nesting
                raise DataError(path, lineno, None, f"invalid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
            if not isinstance(rec, dict):
                raise DataError(path, lineno, None, f"expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec
