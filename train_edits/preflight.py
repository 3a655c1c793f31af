"""What a run checks before it loads any model: each failure is a one-line ConfigError (exit code 2)
naming the option, the file and the line, instead of a traceback an hour into the run.

* numbers: finite and in range (the config models refuse inf / nan: ``allow_inf_nan=False``);
* the run directory: creatable and writable;
* the store (``--store``): a well-formed URI; a local one a writable directory (or creatable);
* the task's data files: present, UTF-8, valid JSON records of the task's shape, none longer than
  ``task.max_record_chars`` (read once here; the run reads them again, cheaply);
* the corpora G and R: present, their first record readable.
"""

from __future__ import annotations

import os
from pathlib import Path

from ensemble.jsonl import DataError, iter_jsonl
from sensepack_common.errors import ConfigError

from .config import RunConfig
from .tasks import TaskData


def check_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".sensepack-write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--run-dir {run_dir}: not writable ({exc.strerror or exc})") from None


def check_store(uri: str) -> None:
    from edits_store.errors import PackError
    from edits_store.store import open_store

    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--store {uri}: not a directory")
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"--store {uri}: not writable")
        return
    try:
        open_store(uri)
    except (PackError, ValueError, ImportError) as exc:
        raise ConfigError(f"--store {uri}: {exc}") from None


def check_data(cfg: RunConfig) -> None:
    t = cfg.task
    name, loss_type, threshold, train = t.resolved()
    try:
        TaskData.load(name, loss_type, threshold, train, t.eval, t.hard_neg, t.unconditional, t.max_record_chars)
    except DataError as exc:
        raise ConfigError(f"task data: {exc}") from None
    for option, path in (("--g", cfg.corpora.g), ("--r", cfg.corpora.r)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise ConfigError(f"{option} {path}: corpus file not found")
        try:
            next(iter_jsonl(path), None)
        except DataError as exc:
            raise ConfigError(f"{option}: {exc}") from None


def preflight(cfg: RunConfig, run_dir: Path) -> None:
    """Everything a run can check before it loads a model (ConfigError: exit code 2)."""
    check_run_dir(run_dir)
    if cfg.store:
        check_store(cfg.store)
    check_data(cfg)
