"""Storage backends behind one interface: a local directory and any fsspec filesystem (S3 in practice).

Layout (identical on both; DESIGN §3):

    <root>/<name>/<version>/senses.safetensors
    <root>/<name>/<version>/manifest.json        <- written last: the commit marker
    <root>/<name>/_aliases/<alias>.json          <- one small JSON document per alias
    <root>/.staging/<uuid>/                      <- local only: versions being written
    <root>/.trash/<uuid>/                        <- local only: versions being deleted

Atomicity:
- local: a version is written and fsynced in ``.staging`` and appears with one ``os.rename`` (a reader sees no
  directory or the complete one); an alias is replaced with ``os.replace`` of a fsynced temp file; a deletion
  renames the version into ``.trash`` first. Alias moves and deletions of one pack take an ``flock`` so that
  "delete unless an alias points here" cannot race "point an alias here".
- fsspec/S3: objects are written whole by single PUTs. A version's files are written first and its
  manifest last; a version without a manifest does not exist for readers (a killed publisher leaves only
  invisible orphans that ``gc`` removes). Deletion removes the manifest first. S3 has no lock, so an alias
  set concurrently with a forced delete can dangle; resolving it then fails with PackNotFoundError (the
  server keeps serving what it had).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import PackNotFoundError
from .format import MANIFEST_FILE, NAME_RE, VERSION_RE, PackSource, fsync_dir

log = logging.getLogger("edits_store.backends")

ALIASES_DIR = "_aliases"
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
LOCK_FILE = ".lock"
DEFAULT_GC_AGE_S = 3600.0


@dataclass
class NameScan:
    """What one pack name holds: committed versions (→ publish time, epoch s) and alias change tokens."""

    versions: dict[str, float] = field(default_factory=dict)
    alias_tokens: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """Byte-level storage of pack versions and aliases; the PackStore adds validation and policy."""

    url: str

    @abstractmethod
    def scan(self) -> dict[str, NameScan]:
        """Every pack name with its committed versions and alias tokens (a token changes when the alias file does)."""

    @abstractmethod
    def list_versions(self, name: str) -> dict[str, float]:
        """Committed versions of ``name`` → publish time (epoch seconds)."""

    @abstractmethod
    def version_committed(self, name: str, version: str) -> bool: ...

    @abstractmethod
    def source(self, name: str, version: str) -> PackSource: ...

    @abstractmethod
    def commit_version(self, name: str, version: str, files: dict[str, bytes]) -> bool:
        """Atomically create the version from ``files`` (manifest last); False if it already existed."""

    @abstractmethod
    def remove_version(self, name: str, version: str) -> None:
        """Make the version invisible at once, then remove its files. PackNotFoundError if absent."""

    @abstractmethod
    def read_alias(self, name: str, alias: str) -> bytes | None: ...

    @abstractmethod
    def list_aliases(self, name: str) -> dict[str, bytes]: ...

    @abstractmethod
    def write_alias(self, name: str, alias: str, data: bytes) -> None:
        """Replace the alias document atomically (readers see the old or the new, never a mix)."""

    @abstractmethod
    def remove_alias(self, name: str, alias: str) -> bool: ...

    @abstractmethod
    def gc(self, older_than_s: float = DEFAULT_GC_AGE_S) -> list[str]:
        """Remove leftovers of killed publishers/deleters older than ``older_than_s``; returns what was removed."""

    def lock(self, name: str) -> contextlib.AbstractContextManager:
        """Serialises alias moves and deletions of one pack where the backend can (no-op otherwise)."""
        return contextlib.nullcontext()


# --------------------------------------------------------------------------- local directory


class LocalBackend(Backend):
    """A directory on local disk; atomic by rename, durable by fsync."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)
        self.url = self.root

    def _dir(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _alias_path(self, name: str, alias: str) -> str:
        return self._dir(name, ALIASES_DIR, f"{alias}.json")

    def scan(self) -> dict[str, NameScan]:
        out: dict[str, NameScan] = {}
        for name in self._names():
            scan = NameScan(versions=self.list_versions(name))
            alias_dir = self._dir(name, ALIASES_DIR)
            for entry in _scandir(alias_dir):
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    st = entry.stat()
                    scan.alias_tokens[entry.name[:-5]] = (st.st_ino, st.st_mtime_ns, st.st_size)
            if scan.versions or scan.alias_tokens:
                out[name] = scan
        return out

    def _names(self) -> list[str]:
        return sorted(e.name for e in _scandir(self.root) if e.is_dir() and NAME_RE.match(e.name))

    def list_versions(self, name: str) -> dict[str, float]:
        out = {}
        for entry in _scandir(self._dir(name)):
            if VERSION_RE.match(entry.name):
                try:
                    out[entry.name] = os.stat(os.path.join(entry.path, MANIFEST_FILE)).st_mtime
                except FileNotFoundError:
                    continue  # not a committed version (cannot be produced by commit_version)
        return out

    def version_committed(self, name: str, version: str) -> bool:
        return os.path.isfile(self._dir(name, version, MANIFEST_FILE))

    def source(self, name: str, version: str) -> PackSource:
        return PackSource(self._dir(name, version), label=f"{name}@{version}")

    def commit_version(self, name: str, version: str, files: dict[str, bytes]) -> bool:
        final = self._dir(name, version)
        if self.version_committed(name, version):
            return False
        if os.path.isdir(final):  # an uncommitted directory (only tampering makes one): set it aside
            os.makedirs(self._dir(TRASH_DIR), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, self._dir(TRASH_DIR, uuid.uuid4().hex))
        self._gc_dir(STAGING_DIR, DEFAULT_GC_AGE_S)
        staging = self._dir(STAGING_DIR, uuid.uuid4().hex)
        os.makedirs(staging)
        try:
            for fname, data in files.items():
                with open(os.path.join(staging, fname), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(staging)
            os.makedirs(self._dir(name), exist_ok=True)
            try:
                os.rename(staging, final)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and self.version_committed(name, version):
                    return False  # a concurrent publisher of the same content won; same bytes by construction
                raise
            fsync_dir(self._dir(name))
            fsync_dir(self.root)
            return True
        finally:
            if os.path.exists(staging):
                shutil.rmtree(staging, ignore_errors=True)

    def remove_version(self, name: str, version: str) -> None:
        trash = self._dir(TRASH_DIR, uuid.uuid4().hex)
        os.makedirs(self._dir(TRASH_DIR), exist_ok=True)
        try:
            os.rename(self._dir(name, version), trash)
        except FileNotFoundError:
            raise PackNotFoundError("no such version", pack=f"{name}@{version}", check="exists") from None
        fsync_dir(self._dir(name))
        shutil.rmtree(trash, ignore_errors=True)

    def read_alias(self, name: str, alias: str) -> bytes | None:
        try:
            with open(self._alias_path(name, alias), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def list_aliases(self, name: str) -> dict[str, bytes]:
        out = {}
        for entry in _scandir(self._dir(name, ALIASES_DIR)):
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                data = self.read_alias(name, entry.name[:-5])
                if data is not None:
                    out[entry.name[:-5]] = data
        return out

    def write_alias(self, name: str, alias: str, data: bytes) -> None:
        alias_dir = self._dir(name, ALIASES_DIR)
        os.makedirs(alias_dir, exist_ok=True)
        tmp = os.path.join(alias_dir, f".{alias}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._alias_path(name, alias))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        fsync_dir(alias_dir)

    def remove_alias(self, name: str, alias: str) -> bool:
        try:
            os.unlink(self._alias_path(name, alias))
        except FileNotFoundError:
            return False
        fsync_dir(self._dir(name, ALIASES_DIR))
        return True

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        os.makedirs(self._dir(name), exist_ok=True)
        with open(self._dir(name, LOCK_FILE), "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _gc_dir(self, sub: str, older_than_s: float) -> list[str]:
        removed = []
        cutoff = time.time() - older_than_s
        for entry in _scandir(self._dir(sub)):
            try:
                if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(entry.path)
            except FileNotFoundError:
                continue
        return removed

    def gc(self, older_than_s: float = DEFAULT_GC_AGE_S) -> list[str]:
        removed = self._gc_dir(STAGING_DIR, older_than_s) + self._gc_dir(TRASH_DIR, older_than_s)
        for name in self._names():  # alias temp files of killed writers
            cutoff = time.time() - older_than_s
            for entry in _scandir(self._dir(name, ALIASES_DIR)):
                if not entry.name.endswith(".tmp"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime <= cutoff:
                        os.unlink(entry.path)
                        removed.append(entry.path)
        if removed:
            log.info("event=gc backend=local root=%s removed=%d", self.root, len(removed))
        return removed


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


# --------------------------------------------------------------------------- fsspec (S3)


def _mtime(info: dict[str, Any]) -> float:
    for key in ("LastModified", "mtime", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


class FsspecBackend(Backend):
    """Any fsspec filesystem (S3 through s3fs); the manifest object is the commit marker."""

    def __init__(self, fs: Any, root: str, url: str):
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _relative(self, path: str) -> list[str]:
        path = path.rstrip("/")
        prefix = self.root + "/"
        if not path.startswith(prefix):
            # some filesystems return paths without a leading slash or protocol; compare stripped forms
            stripped_root = self.root.lstrip("/") + "/"
            path = path.lstrip("/")
            if not path.startswith(stripped_root):
                return []
            return path[len(stripped_root):].split("/")
        return path[len(prefix):].split("/")

    def _find(self, *parts: str) -> dict[str, dict]:
        try:
            return self.fs.find(self._path(*parts), detail=True)
        except FileNotFoundError:
            return {}

    def scan(self) -> dict[str, NameScan]:
        out: dict[str, NameScan] = {}
        for path, info in self._find().items():
            rel = self._relative(path)
            if len(rel) != 3 or not NAME_RE.match(rel[0]):
                continue
            name, middle, leaf = rel
            if VERSION_RE.match(middle) and leaf == MANIFEST_FILE:
                out.setdefault(name, NameScan()).versions[middle] = _mtime(info)
            elif middle == ALIASES_DIR and leaf.endswith(".json"):
                token = info.get("ETag") or info.get("etag") or (info.get("size"), _mtime(info))
                out.setdefault(name, NameScan()).alias_tokens[leaf[:-5]] = token
        return out

    def list_versions(self, name: str) -> dict[str, float]:
        out = {}
        for path, info in self._find(name).items():
            rel = self._relative(path)
            if len(rel) == 3 and rel[0] == name and VERSION_RE.match(rel[1]) and rel[2] == MANIFEST_FILE:
                out[rel[1]] = _mtime(info)
        return out

    def version_committed(self, name: str, version: str) -> bool:
        return bool(self.fs.exists(self._path(name, version, MANIFEST_FILE)))

    def source(self, name: str, version: str) -> PackSource:
        return PackSource(self._path(name, version), fs=self.fs, label=f"{name}@{version}")

    def commit_version(self, name: str, version: str, files: dict[str, bytes]) -> bool:
        if self.version_committed(name, version):
            return False
        for fname, data in files.items():
            if fname != MANIFEST_FILE:
                self.fs.pipe_file(self._path(name, version, fname), data)
        self.fs.pipe_file(self._path(name, version, MANIFEST_FILE), files[MANIFEST_FILE])
        return True

    def remove_version(self, name: str, version: str) -> None:
        manifest = self._path(name, version, MANIFEST_FILE)
        if not self.fs.exists(manifest):
            raise PackNotFoundError("no such version", pack=f"{name}@{version}", check="exists")
        self.fs.rm_file(manifest)  # uncommit first: from here on readers treat the version as absent
        for path in self._find(name, version):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def read_alias(self, name: str, alias: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(name, ALIASES_DIR, f"{alias}.json"))
        except FileNotFoundError:
            return None

    def list_aliases(self, name: str) -> dict[str, bytes]:
        out = {}
        for path in self._find(name, ALIASES_DIR):
            leaf = path.rstrip("/").rsplit("/", 1)[-1]
            if leaf.endswith(".json"):
                data = self.read_alias(name, leaf[:-5])
                if data is not None:
                    out[leaf[:-5]] = data
        return out

    def write_alias(self, name: str, alias: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name, ALIASES_DIR, f"{alias}.json"), data)  # one PUT: atomic replace

    def remove_alias(self, name: str, alias: str) -> bool:
        try:
            self.fs.rm_file(self._path(name, ALIASES_DIR, f"{alias}.json"))
        except FileNotFoundError:
            return False
        return True

    def gc(self, older_than_s: float = DEFAULT_GC_AGE_S) -> list[str]:
        """Delete files of uncommitted versions (no manifest) older than the cutoff."""
        cutoff = time.time() - older_than_s
        committed: set[tuple[str, str]] = set()
        candidates: list[tuple[str, str, str, float]] = []
        for path, info in self._find().items():
            rel = self._relative(path)
            if len(rel) == 3 and VERSION_RE.match(rel[1]):
                if rel[2] == MANIFEST_FILE:
                    committed.add((rel[0], rel[1]))
                else:
                    candidates.append((rel[0], rel[1], path, _mtime(info)))
        removed = []
        for name, version, path, mtime in candidates:
            if (name, version) not in committed and mtime <= cutoff:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)
                removed.append(path)
        if removed:
            log.info("event=gc backend=fsspec url=%s removed=%d", self.url, len(removed))
        return removed
