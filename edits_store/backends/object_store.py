"""Any fsspec filesystem (S3 in practice): whole-object PUTs, conditional writes, leases and fences (see the
package docstring)."""

from __future__ import annotations

import contextlib
import errno
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from ..errors import ConcurrentUpdateError, PackNotFoundError, StoreIOError
from ..format import MANIFEST_FILE, NAME_RE, VERSION_RE, PackFiles
from .base import (
    ALIASES_DIR,
    DEFAULT_GC_AGE_S,
    FENCE_TTL_S,
    FENCES_DIR,
    HISTORY_DIR,
    LEASE_TTL_S,
    LEASES_DIR,
    SEQ_DIR,
    Backend,
    NameScan,
    Verifier,
    etag,
    parse_seq_entry,
    seq_entry,
)

log = logging.getLogger("edits_store.backends")


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

    # A listing per watched name costs a request each, a whole listing about a tenth of one per name (moto:
    # 28 ms per name listed alone, 2.8 ms per name in a 10,000-name listing): watch by name below this share.
    per_name_scan_share = 0.1
    scan_threads = 8  # concurrent per-name listings (each is a round trip)

    def __init__(self, fs: Any, root: str, url: str):
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        self.conditional = hasattr(fs, "call_s3")  # s3fs: If-None-Match / If-Match on PUT
        self._names_listed: int | None = None  # names in the last whole listing

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

    def scan(self, names: Iterable[str] | None = None) -> dict[str, NameScan]:
        out: dict[str, NameScan] = {}
        wanted = None if names is None else {n for n in names if NAME_RE.match(n)}
        by_name = (
            wanted is not None
            and self._names_listed is not None
            and len(wanted) <= self.per_name_scan_share * self._names_listed
        )
        found: dict[str, dict[str, Any]] = {}
        if by_name:  # a listing under each watched name: the cost follows the names watched, not the store's size
            assert wanted is not None
            with ThreadPoolExecutor(self.scan_threads) as ex:
                for part in ex.map(self._find, sorted(wanted)):
                    found.update(part)
        else:
            found = self._find()
            self._names_listed = len({rel[0] for rel in map(self._relative, found) if rel and NAME_RE.match(rel[0])})
        for path, info in found.items():
            rel = self._relative(path)
            if len(rel) != 3 or not NAME_RE.match(rel[0]) or (wanted is not None and rel[0] not in wanted):
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
            parsed = parse_seq_entry(path.rstrip("/").rsplit("/", 1)[-1])
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
                self._put(self._path(name, SEQ_DIR, seq_entry(seq, version)), b"", create=True)
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
                        self._put(key, data, if_match=etag(expect))
                    except ConcurrentUpdateError:
                        # Where an ETag is not the md5 of the bytes (SSE-KMS), retry with the stored ETag if
                        # the document is still the one this move was computed from.
                        try:
                            stored = str(self.fs.info(key).get("ETag", "")).strip('"')
                        except FileNotFoundError:
                            raise ConcurrentUpdateError(
                                "the alias was removed concurrently; retry", pack=f"{name}@{alias}", check="alias_cas"
                            ) from None
                        if not stored or stored == etag(expect) or self.read_alias(name, alias) != expect:
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
