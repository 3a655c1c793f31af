"""A local directory: staging, fsync and one rename to commit, flock for writers (see the package docstring)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator

from ..errors import ConcurrentUpdateError, MissingFileError, PackNotFoundError, StoreIOError, UnsafeFileError
from ..format import MANIFEST_FILE, NAME_RE, VERSION_RE, PackFiles, fsync_dir
from .base import (
    ALIASES_DIR,
    DEFAULT_GC_AGE_S,
    HISTORY_DIR,
    LOCK_FILE,
    SEQ_DIR,
    STAGING_DIR,
    TRASH_DIR,
    Backend,
    NameScan,
    Verifier,
    parse_seq_entry,
    seq_entry,
)

log = logging.getLogger("edits_store.backends")


# --------------------------------------------------------------------------- local directory


@contextlib.contextmanager
def _io_errors(what: str, pack: str | None = None) -> Iterator[None]:
    """ENOSPC, EROFS, EACCES, EIO... → StoreIOError naming the operation (never a raw traceback)."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise StoreIOError(
            f"{what} failed: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""),
            pack=pack,
            check="io",
        ) from None


class LocalBackend(Backend):
    """A directory on local disk; atomic by rename, durable by fsync."""

    def __init__(self, root: str | os.PathLike[str], create: bool = True):
        self.root = os.path.realpath(os.path.abspath(os.fspath(root)))
        if not os.path.isdir(self.root):
            if not create:
                raise PackNotFoundError(
                    f"no store at {self.root} (a typo? stores are created by publish)",
                    pack=self.root,
                    check="store_exists",
                )
            with _io_errors("creating the store"):
                os.makedirs(self.root, exist_ok=True)
        self.url = self.root

    def _dir(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _alias_path(self, name: str, alias: str) -> str:
        return self._dir(name, ALIASES_DIR, f"{alias}.json")

    def _makedirs(self, *parts: str) -> str:
        """Create a folder under the root, fsyncing each parent it had to add an entry to."""
        path = self.root
        for part in parts:
            parent, path = path, os.path.join(path, part)
            if not os.path.isdir(path):
                with _io_errors(f"creating {path}"):
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(path)
                    fsync_dir(parent)
        return path

    def scan(self, names: Iterable[str] | None = None) -> dict[str, NameScan]:
        out: dict[str, NameScan] = {}
        for name in self._names() if names is None else sorted(n for n in set(names) if NAME_RE.match(n)):
            scan = NameScan(versions=self.list_versions(name))
            alias_dir = self._dir(name, ALIASES_DIR)
            for entry in _scandir(alias_dir):
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        scan.alias_tokens[entry.name[:-5]] = (st.st_ino, st.st_mtime_ns, st.st_size)
            if scan.versions or scan.alias_tokens:
                out[name] = scan
        return out

    def _names(self) -> list[str]:
        return sorted(e.name for e in _scandir(self.root) if e.is_dir(follow_symlinks=False) and NAME_RE.match(e.name))

    def list_versions(self, name: str) -> dict[str, float]:
        out = {}
        for entry in _scandir(self._dir(name)):
            if VERSION_RE.match(entry.name) and entry.is_dir(follow_symlinks=False):
                try:
                    out[entry.name] = os.lstat(os.path.join(entry.path, MANIFEST_FILE)).st_mtime
                except FileNotFoundError:
                    continue  # not a committed version (cannot be produced by commit_version)
        return out

    def list_seqs(self, name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for entry in _scandir(self._dir(name, SEQ_DIR)):
            parsed = parse_seq_entry(entry.name)
            if parsed is not None:
                out[parsed[1]] = max(out.get(parsed[1], 0), parsed[0])
        return out

    def version_committed(self, name: str, version: str) -> bool:
        folder = self._dir(name, version)
        return not os.path.islink(folder) and os.path.isfile(os.path.join(folder, MANIFEST_FILE))

    def source(self, name: str, version: str) -> PackFiles:
        return PackFiles(self._dir(name, version), label=f"{name}@{version}", root=self.root)

    def commit_version(self, name: str, version: str, files: dict[str, bytes], verify: Verifier) -> bool:
        if self.version_committed(name, version):
            return False
        staging_root = self._makedirs(STAGING_DIR)
        staging = os.path.join(staging_root, uuid.uuid4().hex)
        try:
            return self._commit_staged(name, version, files, verify, staging)
        except FileNotFoundError:  # gc moved the staging folder away (it was older than gc's cutoff)
            raise ConcurrentUpdateError(
                "the staging folder was removed (by gc?) before the commit; retry",
                pack=f"{name}@{version}",
                check="staging",
            ) from None
        finally:
            if os.path.lexists(staging):
                shutil.rmtree(staging, ignore_errors=True)

    def _commit_staged(self, name: str, version: str, files: dict[str, bytes], verify: Verifier, staging: str) -> bool:
        with _io_errors("writing the version", f"{name}@{version}"):
            os.mkdir(staging)
            for fname, data in files.items():
                if fname != MANIFEST_FILE:
                    _write_fsync(os.path.join(staging, fname), data)
        self._hook("local_files_written")
        # Read back what is on disk, through the loader, before the version can become visible.
        try:
            verify(PackFiles(staging, label=f"{name}@{version} (staging)"), files[MANIFEST_FILE])
        except (MissingFileError, PackNotFoundError):
            if not os.path.isdir(staging):
                raise FileNotFoundError(staging) from None  # gc took it: reported as ConcurrentUpdateError
            raise
        with _io_errors("writing the version", f"{name}@{version}"):
            _write_fsync(os.path.join(staging, MANIFEST_FILE), files[MANIFEST_FILE])
            fsync_dir(staging)
        self._makedirs(name)
        with self.lock(name):
            if self.version_committed(name, version):
                return False
            self.claim_seq(name, version)
            self._hook("local_before_rename")
            try:
                os.rename(staging, self._dir(name, version))  # an empty folder there is replaced atomically
            except FileNotFoundError:
                raise
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise UnsafeFileError(
                        "an uncommitted folder (or file) occupies the version's place; `packs gc` removes it",
                        pack=f"{name}@{version}",
                        check="version_folder",
                    ) from None
                raise StoreIOError(
                    f"commit failed: {exc.strerror or exc}", pack=f"{name}@{version}", check="io"
                ) from None
            with _io_errors("syncing the pack folder", f"{name}@{version}"):
                fsync_dir(self._dir(name))
        return True

    def claim_seq(self, name: str, version: str) -> int:
        """Under the pack's lock: the next sequence number, recorded as an exclusive-create file."""
        seq_dir = self._makedirs(name, SEQ_DIR)
        seq = max((p[0] for p in map(parse_seq_entry, os.listdir(seq_dir)) if p), default=0) + 1
        with _io_errors("claiming a sequence number", f"{name}@{version}"):
            fd = os.open(os.path.join(seq_dir, seq_entry(seq, version)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.fsync(fd)
            os.close(fd)
            fsync_dir(seq_dir)
        return seq

    def remove_version(self, name: str, version: str) -> None:
        trash = os.path.join(self._makedirs(TRASH_DIR), uuid.uuid4().hex)
        with _io_errors("deleting the version", f"{name}@{version}"):
            try:
                os.rename(self._dir(name, version), trash)
            except FileNotFoundError:
                raise PackNotFoundError("no such version", pack=f"{name}@{version}", check="exists") from None
            fsync_dir(self._dir(name))
        shutil.rmtree(trash, ignore_errors=True)

    def read_alias(self, name: str, alias: str) -> bytes | None:
        try:
            with open(self._alias_path(name, alias), "rb") as f:
                return f.read(1 << 16)
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

    def write_alias(self, name: str, alias: str, data: bytes, expect: bytes | None) -> None:
        """Call under ``lock(name)``: the comparison with ``expect`` and the replace are then one step."""
        if self.read_alias(name, alias) != expect:
            raise ConcurrentUpdateError(
                "the alias changed while it was being moved; retry", pack=f"{name}@{alias}", check="alias_cas"
            )
        alias_dir = self._makedirs(name, ALIASES_DIR)
        tmp = os.path.join(alias_dir, f".{alias}.{uuid.uuid4().hex}.tmp")
        try:
            with _io_errors("writing the alias", f"{name}@{alias}"):
                _write_fsync(tmp, data)
                self._hook("local_alias_before_replace")
                os.replace(tmp, self._alias_path(name, alias))
                fsync_dir(alias_dir)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def remove_alias(self, name: str, alias: str) -> bool:
        with _io_errors("removing the alias", f"{name}@{alias}"):
            try:
                os.unlink(self._alias_path(name, alias))
            except FileNotFoundError:
                return False
            fsync_dir(self._dir(name, ALIASES_DIR))
        return True

    def append_history(self, name: str, alias: str, seq: int, data: bytes) -> None:
        folder = self._makedirs(name, HISTORY_DIR, alias)
        path = os.path.join(folder, f"{seq:012d}.json")
        with _io_errors("appending alias history", f"{name}@{alias}"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(folder)

    def list_history(self, name: str) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for alias_dir in sorted(_scandir(self._dir(name, HISTORY_DIR)), key=lambda e: e.name):
            entries = sorted(e.name for e in _scandir(alias_dir.path) if e.name.endswith(".json"))
            docs = []
            for leaf in entries:
                with contextlib.suppress(FileNotFoundError), open(os.path.join(alias_dir.path, leaf), "rb") as f:
                    docs.append(f.read(1 << 16))
            out[alias_dir.name] = docs
        return out

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        folder = self._makedirs(name)
        with contextlib.ExitStack() as stack:
            with _io_errors("locking the pack", name):  # only the open is an I/O error of the lock
                f = stack.enter_context(open(os.path.join(folder, LOCK_FILE), "a+b"))
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _gc_dir(self, sub: str, older_than_s: float) -> list[str]:
        """Move each old entry into .trash by rename (atomic: a publisher's own rename then fails cleanly), then
        delete it."""
        removed = []
        cutoff = time.time() - older_than_s
        for entry in _scandir(self._dir(sub)):
            try:
                if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
                if sub != TRASH_DIR:
                    doomed = os.path.join(self._makedirs(TRASH_DIR), uuid.uuid4().hex)
                    os.rename(entry.path, doomed)
                else:
                    doomed = entry.path
            except FileNotFoundError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(entry.path)
        return removed

    def gc(self, older_than_s: float = DEFAULT_GC_AGE_S) -> list[str]:
        removed = self._gc_dir(STAGING_DIR, older_than_s) + self._gc_dir(TRASH_DIR, older_than_s)
        cutoff = time.time() - older_than_s
        for name in self._names():
            for entry in _scandir(self._dir(name, ALIASES_DIR)):  # alias temp files of killed writers
                if not entry.name.endswith(".tmp"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime <= cutoff:
                        os.unlink(entry.path)
                        removed.append(entry.path)
            for entry in _scandir(self._dir(name)):  # version folders without a manifest (tampering only)
                if not VERSION_RE.match(entry.name) or self.version_committed(name, entry.name):
                    continue
                with self.lock(name):  # a publisher renames onto an empty folder under this lock
                    if self.version_committed(name, entry.name):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(entry.path, os.path.join(self._makedirs(TRASH_DIR), uuid.uuid4().hex))
                        removed.append(entry.path)
        self._gc_dir(TRASH_DIR, 0.0)
        if removed:
            log.info("event=gc backend=local root=%s removed=%d", self.root, len(removed))
        return removed


def _write_fsync(path: str, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
