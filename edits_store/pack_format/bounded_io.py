"""Bounded, symlink-safe file I/O for packs: reading a version's files with caps and an overlapping
hash thread (`PackFiles`), and durable writes (fsync of files and folders).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import stat
import threading
from typing import Any

from ..errors import (
    HashMismatchError,
    PackError,
    StoreIOError,
    TruncatedFileError,
    UnsafeFileError,
)
from .manifest import TENSOR_FILE
from .tensors import declared_safetensors_size

log = logging.getLogger("edits_store.format")

_HASH_CHUNK = 1 << 21  # 2 MiB: small enough to overlap reading and hashing, large enough to amortise queue costs


def fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PendingHash:
    """A sha256 computed in a background thread over a buffer that is still being filled."""

    def __init__(self, buf: bytearray):
        self._view = memoryview(buf)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._hasher = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name="pack-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (span := self._queue.get()) is not None:
            self._hasher.update(self._view[span[0] : span[1]])

    def feed(self, start: int, end: int) -> None:
        self._queue.put((start, end))

    def finish(self) -> str:
        """Stop and join the thread (idempotent); the digest of everything fed."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._view.release()
        return self._hasher.hexdigest()


def _open_regular(path: str, *, cap: int, source: str, fname: str) -> tuple[int, int]:
    """(fd, size) of a regular file that is no symlink and no larger than ``cap``; refuses anything else unread.

    O_NONBLOCK makes opening a FIFO return at once (it would otherwise wait for a writer forever); O_NOFOLLOW
    refuses a symlink, which could point anywhere outside the store.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(
                "is a symlink; pack files must be regular files inside the pack folder",
                pack=source,
                file=fname,
                check="symlink",
            ) from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FileNotFoundError(path) from None
        raise StoreIOError(f"cannot open: {exc.strerror or exc}", pack=source, file=fname, check="read") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(
                "is not a regular file (a FIFO, device or directory is never read)",
                pack=source,
                file=fname,
                check="regular_file",
            )
        if st.st_size > cap:
            raise UnsafeFileError(
                f"has {st.st_size} bytes, more than the {cap} its manifest allows",
                pack=source,
                file=fname,
                check="size",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _fill(fd: int, buf: bytearray, pending: _PendingHash | None) -> int:
    """Read into ``buf`` chunk by chunk, feeding each chunk to ``pending``; bytes read (less if the file shrank)."""
    size = len(buf)
    view = memoryview(buf)
    pos = 0
    try:
        while pos < size:
            got = os.readv(fd, [view[pos : min(size, pos + _HASH_CHUNK)]])
            if not got:
                break
            if pending is not None:
                pending.feed(pos, pos + got)
            pos += got
    finally:
        view.release()
    return pos


def _read_fd(fd: int, size: int) -> bytearray:
    buf = bytearray(size)
    got = _fill(fd, buf, None)
    if got < size:
        del buf[got:]
    return buf


class PackFiles:
    """Where a pack's files come from: a local folder, or a folder on an fsspec filesystem.

    ``root`` (local): the store root the folder must lie in; the folder and its parents up to ``root`` may not be
    symlinks. Reads are bounded and return only after any hashing thread has been joined.
    """

    def __init__(self, location: str, *, fs: Any = None, label: str | None = None, root: str | None = None):
        self.location = location.rstrip("/") if fs is not None else os.fspath(location)
        self.fs = fs
        self.label = label or self.location
        self.root = root

    def _path(self, fname: str) -> str:
        return f"{self.location}/{fname}" if self.fs is not None else os.path.join(self.location, fname)

    def folder_exists(self) -> bool:
        if self.fs is None:
            return os.path.isdir(self.location)
        return bool(self.fs.exists(self.location))

    def check_confined(self) -> None:
        """Local store folders: no symlinked folder between the store root and the files."""
        if self.fs is not None or self.root is None:
            return
        path = os.path.abspath(self.location)
        while path != self.root and path.startswith(self.root + os.sep):
            if os.path.islink(path):
                raise UnsafeFileError(
                    f"folder {path} is a symlink; a store never follows links out of itself",
                    pack=self.label,
                    check="symlink",
                )
            path = os.path.dirname(path)

    def read(self, fname: str, cap: int) -> bytes:
        """Whole file, at most ``cap`` bytes (UnsafeFileError beyond); FileNotFoundError if absent."""
        return bytes(self.read_hashing(fname, cap, hashing=False)[0])

    def read_hashing(self, fname: str, cap: int, hashing: bool = True) -> tuple[bytearray, str]:
        """(whole file, its sha256 hex); the hash is computed while the file is read."""
        if self.fs is not None:
            return self._read_fs(fname, cap, hashing)
        fd, size = _open_regular(self._path(fname), cap=cap, source=self.label, fname=fname)
        try:
            if not hashing:
                return _read_fd(fd, size), ""
            buf = bytearray(size)
            pending = _PendingHash(buf)
            got = 0
            try:
                got = _fill(fd, buf, pending)
            finally:
                digest = pending.finish()  # joined on every path: no thread outlives the call
            if got < size:  # the file shrank while being read: what was read will not match its hash
                del buf[got:]
            return buf, digest
        except OSError as exc:
            raise StoreIOError(
                f"read failed: {exc.strerror or exc}", pack=self.label, file=fname, check="read"
            ) from None
        finally:
            os.close(fd)

    def _read_fs(self, fname: str, cap: int, hashing: bool) -> tuple[bytearray, str]:
        path = self._path(fname)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreIOError(f"cannot stat: {exc}", pack=self.label, file=fname, check="read") from None
        if info.get("type", "file") != "file":
            raise UnsafeFileError("is not a file object", pack=self.label, file=fname, check="regular_file")
        size = info.get("size") or 0
        if size > cap:
            raise UnsafeFileError(
                f"has {size} bytes, more than the {cap} its manifest allows", pack=self.label, file=fname, check="size"
            )
        try:
            # bounded by a range read; an object that was empty when listed is taken as empty (a range on an
            # empty object is an error on S3)
            data = bytearray(self.fs.cat_file(path, start=0, end=cap + 1) if size else b"")
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreIOError(f"read failed: {exc}", pack=self.label, file=fname, check="read") from None
        if len(data) > cap:  # replaced by a larger object between the stat and the read
            raise UnsafeFileError(
                f"has more than the {cap} bytes its manifest allows", pack=self.label, file=fname, check="size"
            )
        return data, (hashlib.sha256(data).hexdigest() if hashing else "")


def hash_failure(fname: str, data: bytes | bytearray, expected: str, actual: str, source: str) -> PackError:
    if fname == TENSOR_FILE:
        declared = declared_safetensors_size(data)
        if declared is not None and len(data) < declared:
            return TruncatedFileError(
                f"file has {len(data)} bytes but its header declares {declared}: truncated",
                pack=source,
                file=fname,
                check="size",
            )
    return HashMismatchError(
        f"sha256 is {actual}, manifest says {expected} (file has {len(data)} bytes)",
        pack=source,
        file=fname,
        check="sha256",
    )
