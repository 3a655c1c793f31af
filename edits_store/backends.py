"""Storage backends behind one interface: a local directory and any fsspec filesystem (S3 in practice).

Layout (identical on both; DESIGN §3):

    <root>/<name>/<version>/senses.safetensors
    <root>/<name>/<version>/signature.json       <- optional (edits_store.signing)
    <root>/<name>/<version>/manifest.json        <- written last: the commit marker
    <root>/<name>/_seq/<seq:012d>-<version>      <- publish order: a per-name sequence number, claimed exclusively
    <root>/<name>/_aliases/<alias>.json          <- one small JSON document per alias (with its move counter)
    <root>/<name>/_history/<alias>/<seq:012d>.json <- append-only alias history (who/when/from/to)
    <root>/.staging/<uuid>/, <root>/.trash/<uuid>/  <- local only: versions being written / deleted
    <root>/_leases/<name>/<version>/<uuid>       <- S3 only: a publisher is writing this version
    <root>/_fences/<name>/<version>/<uuid>       <- S3 only: a gc or deleter is removing this version's files

Atomicity and races:
- local: a version is written and fsynced in ``.staging``, read back through the loader, and appears with one
  ``os.rename`` under the pack's ``flock``; a committed version is never moved (a second publisher of the same
  content finds the folder taken and returns "already there"). gc moves a staging folder into ``.trash`` by
  rename before deleting it, so it can never delete part of a folder a publisher is about to commit. Alias
  moves and deletions take the same ``flock``.
- fsspec/S3: objects are written whole by single PUTs. A version's files are written first, read back, and its
  manifest is PUT last with ``If-None-Match: *`` (exactly one publisher commits). A publisher holds a lease
  object while it writes; gc and deletion put a fence object, then look for leases: gc skips a version with a
  live lease, deletion leaves its files to the publisher; a publisher waits while a live fence exists before
  writing. (Fence then look / lease then look: at least one side sees the other, so gc or a deleter can never
  remove a file under a publisher's manifest.) Alias documents are replaced with ``If-Match`` on their ETag
  (``If-None-Match`` when new): a lost race is a ConcurrentUpdateError, never a lost move. gc aborts multipart
  uploads older than its cutoff.
- Every backend calls ``hook(point)`` at named points of its writers when a hook is set: a test seam to hold a
  writer inside a race window; production code never sets it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import ConcurrentUpdateError, MissingFileError, PackNotFoundError, StoreIOError, UnsafeFileError
from .format import MANIFEST_FILE, NAME_RE, VERSION_RE, PackFiles, fsync_dir

log = logging.getLogger("edits_store.backends")

ALIASES_DIR = "_aliases"
HISTORY_DIR = "_history"
SEQ_DIR = "_seq"
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
LEASES_DIR = "_leases"
FENCES_DIR = "_fences"
LOCK_FILE = ".lock"
DEFAULT_GC_AGE_S = 3600.0
FENCE_TTL_S = 60.0  # a fence older than this belongs to a killed gc/deleter and is ignored
LEASE_TTL_S = DEFAULT_GC_AGE_S  # a deleter leaves files to a publisher whose lease is younger than this

# verify(source_with_the_written_files, manifest_bytes): raises PackError unless they load; run before commit.
Verifier = Callable[[PackFiles, bytes], None]


@dataclass
class NameScan:
    """What one pack name holds: committed versions (→ publish time, epoch s) and alias change tokens."""

    versions: dict[str, float] = field(default_factory=dict)
    alias_tokens: dict[str, Any] = field(default_factory=dict)


def _seq_entry(seq: int, version: str) -> str:
    return f"{seq:012d}-{version}"


def _parse_seq_entry(leaf: str) -> tuple[int, str] | None:
    seq, _, version = leaf.partition("-")
    if len(seq) == 12 and seq.isdigit() and VERSION_RE.match(version):
        return int(seq), version
    return None


def _etag(data: bytes) -> str:
    """The token a conditional alias write compares: the md5 of the document (S3's ETag of a single PUT)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class Backend(ABC):
    """Byte-level storage of pack versions and aliases; the PackStore adds validation and policy."""

    url: str
    hook: Callable[[str], None] | None = None  # test seam, see the module docstring

    def _hook(self, point: str) -> None:
        if self.hook is not None:
            self.hook(point)

    @abstractmethod
    def scan(self) -> dict[str, NameScan]:
        """Every pack name with its committed versions and alias tokens (a token changes when the alias file does)."""

    @abstractmethod
    def list_versions(self, name: str) -> dict[str, float]:
        """Committed versions of ``name`` → publish time (epoch seconds)."""

    @abstractmethod
    def list_seqs(self, name: str) -> dict[str, int]:
        """version → the highest sequence number claimed for it (committed or not)."""

    @abstractmethod
    def version_committed(self, name: str, version: str) -> bool: ...

    @abstractmethod
    def source(self, name: str, version: str) -> PackFiles: ...

    @abstractmethod
    def commit_version(self, name: str, version: str, files: dict[str, bytes], verify: Verifier) -> bool:
        """Write ``files``, ``verify`` them, claim a sequence number, commit the manifest; False if it existed."""

    @abstractmethod
    def remove_version(self, name: str, version: str) -> None:
        """Make the version invisible at once, then remove its files. PackNotFoundError if absent."""

    @abstractmethod
    def read_alias(self, name: str, alias: str) -> bytes | None: ...

    @abstractmethod
    def list_aliases(self, name: str) -> dict[str, bytes]: ...

    @abstractmethod
    def write_alias(self, name: str, alias: str, data: bytes, expect: bytes | None) -> None:
        """Replace the alias document atomically if it still is ``expect`` (None: absent); else
        ConcurrentUpdateError. Readers see the old or the new document, never a mix."""

    @abstractmethod
    def remove_alias(self, name: str, alias: str) -> bool: ...

    @abstractmethod
    def append_history(self, name: str, alias: str, seq: int, data: bytes) -> None:
        """Create history entry ``seq`` of the alias (never overwrites)."""

    @abstractmethod
    def list_history(self, name: str) -> dict[str, list[bytes]]:
        """alias → its history entries, oldest first."""

    @abstractmethod
    def gc(self, older_than_s: float = DEFAULT_GC_AGE_S) -> list[str]:
        """Remove leftovers of killed publishers/deleters older than ``older_than_s``; returns what was removed."""

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Serialises alias moves and deletions of one pack where the backend can (no-op otherwise)."""
        return contextlib.nullcontext()


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

    def scan(self) -> dict[str, NameScan]:
        out: dict[str, NameScan] = {}
        for name in self._names():
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
            parsed = _parse_seq_entry(entry.name)
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
        seq = max((p[0] for p in map(_parse_seq_entry, os.listdir(seq_dir)) if p), default=0) + 1
        with _io_errors("claiming a sequence number", f"{name}@{version}"):
            fd = os.open(os.path.join(seq_dir, _seq_entry(seq, version)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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

    poll_s = 0.05
    # A lease younger than this is a live publisher whatever gc's cutoff; a fence older than fence_ttl_s
    # belongs to a killed gc/deleter and is ignored. Per instance so an operator (or a test) can state
    # "the killed writers are long gone".
    lease_ttl_s = 60.0
    fence_ttl_s = FENCE_TTL_S

    def __init__(self, fs: Any, root: str, url: str):
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        self.conditional = hasattr(fs, "call_s3")  # s3fs: If-None-Match / If-Match on PUT

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
            return path[len(stripped_root) :].split("/")
        return path[len(prefix) :].split("/")

    def _find(self, *parts: str) -> dict[str, dict[str, Any]]:
        try:
            found: dict[str, dict[str, Any]] = self.fs.find(self._path(*parts), detail=True)
            return found
        except FileNotFoundError:
            return {}

    @contextlib.contextmanager
    def _io(self, what: str, pack: str | None = None) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, FileExistsError, ConcurrentUpdateError, PackNotFoundError):
            raise
        except OSError as exc:
            raise StoreIOError(f"{what} failed: {exc}", pack=pack, check="io") from None

    def _put(self, path: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> None:
        """One PUT; ``create``: only if absent (FileExistsError otherwise); ``if_match``: only if the object's
        ETag is that (ConcurrentUpdateError otherwise)."""
        if not self.conditional:
            if create and self.fs.exists(path):
                raise FileExistsError(path)
            self.fs.pipe_file(path, data)
            return
        kwargs: dict[str, Any] = {}
        if create:
            kwargs["mode"] = "create"
        if if_match is not None:
            kwargs["IfMatch"] = f'"{if_match}"'
        try:
            self.fs.pipe_file(path, data, **kwargs)
        except FileExistsError:
            raise
        except (FileNotFoundError, OSError) as exc:
            if if_match is not None and (isinstance(exc, FileNotFoundError) or exc.errno == errno.EINVAL):
                raise ConcurrentUpdateError(
                    "the object changed while it was being replaced; retry", pack=path, check="if_match"
                ) from None
            raise

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

    def list_seqs(self, name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for path in self._find(name, SEQ_DIR):
            parsed = _parse_seq_entry(path.rstrip("/").rsplit("/", 1)[-1])
            if parsed is not None:
                out[parsed[1]] = max(out.get(parsed[1], 0), parsed[0])
        return out

    def version_committed(self, name: str, version: str) -> bool:
        return bool(self.fs.exists(self._path(name, version, MANIFEST_FILE)))

    def source(self, name: str, version: str) -> PackFiles:
        return PackFiles(self._path(name, version), fs=self.fs, label=f"{name}@{version}")

    def _live(self, sub: str, name: str, version: str, max_age_s: float) -> list[str]:
        now = time.time()
        return [p for p, info in self._find(sub, name, version).items() if now - _mtime(info) < max_age_s]

    def _wait_for_fences(self, name: str, version: str) -> None:
        deadline = time.monotonic() + self.fence_ttl_s
        while self._live(FENCES_DIR, name, version, self.fence_ttl_s):
            if time.monotonic() > deadline:
                raise ConcurrentUpdateError(
                    "a gc or deletion of this version is still running; retry", pack=f"{name}@{version}", check="fence"
                )
            time.sleep(self.poll_s)

    def commit_version(self, name: str, version: str, files: dict[str, bytes], verify: Verifier) -> bool:
        ref = f"{name}@{version}"
        lease = self._path(LEASES_DIR, name, version, uuid.uuid4().hex)
        with self._io("publishing", ref):
            self._put(lease, b"")
            try:
                self._hook("s3_lease_taken")
                self._wait_for_fences(name, version)
                if self.version_committed(name, version):
                    return False
                for fname, data in files.items():
                    if fname != MANIFEST_FILE:
                        self._put(self._path(name, version, fname), data)
                self._hook("s3_files_written")
                verify(self.source(name, version), files[MANIFEST_FILE])  # read back before the commit
                self.claim_seq(name, version)
                try:
                    self._put(self._path(name, version, MANIFEST_FILE), files[MANIFEST_FILE], create=True)
                except FileExistsError:
                    return False  # a concurrent publisher of the same content committed first: same bytes
                return True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(lease)

    def claim_seq(self, name: str, version: str) -> int:
        """Next sequence number by exclusive create (retried on a collision with a concurrent publisher)."""
        for _ in range(100):
            seqs = self.list_seqs_raw(name)
            seq = max(seqs, default=0) + 1
            try:
                self._put(self._path(name, SEQ_DIR, _seq_entry(seq, version)), b"", create=True)
                return seq
            except FileExistsError:
                continue
        raise ConcurrentUpdateError("could not claim a sequence number", pack=f"{name}@{version}", check="seq")

    def list_seqs_raw(self, name: str) -> list[int]:
        """Every claimed number, including a claim whose key names another version (S3 keys hold the pair)."""
        out = []
        for path in self._find(name, SEQ_DIR):
            leaf = path.rstrip("/").rsplit("/", 1)[-1]
            if len(leaf) > 12 and leaf[:12].isdigit():
                out.append(int(leaf[:12]))
        return out

    def remove_version(self, name: str, version: str) -> None:
        ref = f"{name}@{version}"
        manifest = self._path(name, version, MANIFEST_FILE)
        with self._io("deleting the version", ref):
            if not self.fs.exists(manifest):
                raise PackNotFoundError("no such version", pack=ref, check="exists")
            fence = self._path(FENCES_DIR, name, version, uuid.uuid4().hex)
            self._put(fence, b"")
            try:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(manifest)  # uncommit first: from here on readers treat the version as absent
                self._hook("s3_delete_uncommitted")
                if self._live(LEASES_DIR, name, version, max(self.lease_ttl_s, LEASE_TTL_S)):
                    return  # a publisher is re-creating this content: its files are its own now
                for path in self._find(name, version):
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(fence)

    def _alias_key(self, name: str, alias: str) -> str:
        return self._path(name, ALIASES_DIR, f"{alias}.json")

    def read_alias(self, name: str, alias: str) -> bytes | None:
        try:
            data: bytes = self.fs.cat_file(self._alias_key(name, alias))
            return data
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

    def write_alias(self, name: str, alias: str, data: bytes, expect: bytes | None) -> None:
        key = self._alias_key(name, alias)
        with self._io("writing the alias", f"{name}@{alias}"):
            self._hook("s3_alias_before_put")
            try:
                if expect is None:
                    self._put(key, data, create=True)
                elif self.conditional:
                    try:
                        self._put(key, data, if_match=_etag(expect))
                    except ConcurrentUpdateError:
                        # Where an ETag is not the md5 of the bytes (SSE-KMS), retry with the stored ETag if
                        # the document is still the one this move was computed from.
                        try:
                            stored = str(self.fs.info(key).get("ETag", "")).strip('"')
                        except FileNotFoundError:
                            raise ConcurrentUpdateError(
                                "the alias was removed concurrently; retry", pack=f"{name}@{alias}", check="alias_cas"
                            ) from None
                        if not stored or stored == _etag(expect) or self.read_alias(name, alias) != expect:
                            raise
                        self._put(key, data, if_match=stored)
                else:
                    if self.read_alias(name, alias) != expect:
                        raise ConcurrentUpdateError("alias changed", pack=f"{name}@{alias}", check="alias_cas")
                    self._put(key, data)
            except FileExistsError:
                raise ConcurrentUpdateError(
                    "the alias was created concurrently; retry", pack=f"{name}@{alias}", check="alias_cas"
                ) from None

    def remove_alias(self, name: str, alias: str) -> bool:
        try:
            self.fs.rm_file(self._alias_key(name, alias))
        except FileNotFoundError:
            return False
        return True

    def append_history(self, name: str, alias: str, seq: int, data: bytes) -> None:
        with self._io("appending alias history", f"{name}@{alias}"):
            self._put(self._path(name, HISTORY_DIR, alias, f"{seq:012d}.json"), data, create=True)

    def list_history(self, name: str) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for path in sorted(self._find(name, HISTORY_DIR)):
            rel = self._relative(path)
            if len(rel) == 4 and rel[3].endswith(".json"):
                with contextlib.suppress(FileNotFoundError):
                    out.setdefault(rel[2], []).append(self.fs.cat_file(path))
        return out

    def gc(self, older_than_s: float = DEFAULT_GC_AGE_S) -> list[str]:
        """Delete files of uncommitted versions (no manifest) older than the cutoff, stale leases and fences, and
        abort multipart uploads older than the cutoff. A version with a live lease (younger than the cutoff) is a
        publisher at work and is left alone."""
        now = time.time()
        cutoff = now - older_than_s
        committed: set[tuple[str, str]] = set()
        candidates: dict[tuple[str, str], list[tuple[str, float]]] = {}
        removed: list[str] = []
        for path, info in self._find().items():
            rel = self._relative(path)
            if len(rel) == 3 and VERSION_RE.match(rel[1]):
                if rel[2] == MANIFEST_FILE:
                    committed.add((rel[0], rel[1]))
                else:
                    candidates.setdefault((rel[0], rel[1]), []).append((path, _mtime(info)))
            elif (
                len(rel) == 4
                and rel[0] in (LEASES_DIR, FENCES_DIR)
                and _mtime(info) <= cutoff
                and now - _mtime(info)
                >= (self.fence_ttl_s if rel[0] == FENCES_DIR else max(older_than_s, self.lease_ttl_s))
            ):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)
                removed.append(path)
        for (name, version), objs in sorted(candidates.items()):
            if (name, version) in committed or not any(m <= cutoff for _, m in objs):
                continue
            fence = self._path(FENCES_DIR, name, version, uuid.uuid4().hex)
            self._put(fence, b"")
            try:
                self._hook("s3_gc_fenced")
                # fence, then look for leases: a publisher that leased before now is seen and left alone; one
                # that leases after sees the fence and waits until it is gone (after the deletes below).
                live = max(older_than_s, self.lease_ttl_s)
                if self._live(LEASES_DIR, name, version, live) or self.version_committed(name, version):
                    continue
                for path, mtime in objs:
                    if mtime <= cutoff:
                        with contextlib.suppress(FileNotFoundError):
                            self.fs.rm_file(path)
                        removed.append(path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(fence)
        removed += self._abort_multipart(cutoff)
        if removed:
            log.info("event=gc backend=fsspec url=%s removed=%d", self.url, len(removed))
        return removed

    def _abort_multipart(self, cutoff: float) -> list[str]:
        """Incomplete multipart uploads under the root older than the cutoff (a killed upload of ≥ 100 MiB)."""
        if not self.conditional:
            return []
        bucket, _, prefix = self.root.partition("/")
        aborted = []
        resp = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/" if prefix else "")
        for up in resp.get("Uploads", []):
            initiated = up.get("Initiated")
            when = initiated.timestamp() if isinstance(initiated, datetime) else 0.0
            if when <= cutoff:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                aborted.append(f"{bucket}/{up['Key']} (multipart upload {up['UploadId']})")
        return aborted
