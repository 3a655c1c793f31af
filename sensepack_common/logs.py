"""Structured logs: one JSON object per line, one setup for the server and the training commands.

A record's fields are its `extra={...}` keys and, as the training steps write them, the keys of an
`extra={"fields": {...}}` dict; both land at the top level of the line. The server's stderr lines carry an ISO
time and the message under "msg"; a training run's `log.jsonl` keeps its own shape (epoch seconds under "ts",
the message under "event"), which `train_edits` and its tests read.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "fields"}
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """`message_key` names the message ("msg" for service logs, "event" for a run's log); `iso_time` writes the
    time as UTC ISO-8601 (service logs) instead of epoch seconds to the millisecond."""

    def __init__(self, message_key: str = "msg", iso_time: bool = True):
        super().__init__()
        self.message_key = message_key
        self.iso_time = iso_time

    def format(self, record: logging.LogRecord) -> str:
        if self.iso_time:
            ts: str | float = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            ts = f"{ts}.{int(record.msecs):03d}Z"
        else:
            ts = round(record.created, 3)
        out = {"ts": ts, "level": record.levelname, "logger": record.name, self.message_key: record.getMessage()}
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Ours:
    """Marks the handlers setup_logging adds, so a second call replaces them instead of adding more."""


class _Stream(_Ours, logging.StreamHandler[TextIO]):
    pass


class _File(_Ours, logging.FileHandler):
    pass


def setup_logging(
    level: str | int = "INFO",
    json_logs: bool = True,
    *,
    logger: str = "",
    file: Path | None = None,
    console_level: str | int | None = None,
) -> None:
    """Log `logger` (the root by default) at `level` to stderr, as JSON lines or plain text; with `file`, also
    every record as a run-log JSON line to that file (the console then shows `console_level` and up), and the
    logger stops propagating so its records are written once."""
    root = logging.getLogger(logger)
    for h in list(root.handlers):
        if isinstance(h, _Ours):
            root.removeHandler(h)
            h.close()
    console = _Stream(sys.stderr)
    console.setFormatter(JsonFormatter() if json_logs else logging.Formatter(PLAIN_FORMAT))
    if console_level is not None:
        console.setLevel(console_level)
    root.addHandler(console)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        fh = _File(file, encoding="utf-8")
        fh.setFormatter(JsonFormatter(message_key="event", iso_time=False))
        root.addHandler(fh)
    root.setLevel(level)
    if logger:
        root.propagate = False
