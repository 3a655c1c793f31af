"""The versioned pack store: immutable content-named versions, mutable aliases, change notifications.

Guarantees (both backends):
- a version is named by its content, so ``name@version`` always means the same bytes; re-publishing is a
  no-op and a "same-name reload" can never serve stale weights: the server compares versions, not names;
- publishing is atomic (see ``backends``): readers see no version or the complete one, also when the
  publisher is killed mid-write;
- every ``load`` fully validates the version (hashes, tensors, compatibility), so a bad pack cannot be served;
- ``load`` returns tensors in memory: deleting a version never disturbs requests already using it;
- a version an alias points to cannot be deleted without ``force``;
- publish reads the written version back through the loader before it becomes visible, so every visible
  version loads (unless tampered with afterwards);
- order is a per-name sequence number claimed at publish (not a file time); every alias move increments the
  alias's own counter and appends to its history (who, when, from, to), and notifications carry that counter
  so a watcher can tell how many moves it missed.

References (``edits_store.references``): ``name`` (alias ``prod`` if set, else the latest published version),
``name@<32-hex version>``, ``name@<alias>``, ``name@latest``.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .backends.base import DEFAULT_GC_AGE_S, Backend, NameScan
from .backends.local import LocalBackend
from .backends.object_store import FsspecBackend
from .errors import (
    AliasError,
    ConcurrentUpdateError,
    InvalidReferenceError,
    MissingFileError,
    PackError,
    PackNotFoundError,
    RetentionError,
    SchemaError,
)
from .format import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    VERSION_RE,
    Expectations,
    PackContents,
    PackFiles,
    compute_version,
    content_digest,
    load_from_source,
    pack_files,
    utc_now_iso,
    validate_tensors,
)
from .references import DEFAULT_ALIAS, LATEST, PackReference, check_alias_name, parse_pack_reference

log = logging.getLogger("edits_store.store")

ALIAS_RETRIES = 20


@dataclass(frozen=True)
class VersionInfo:
    """One committed version as listed by the store."""

    name: str
    version: str
    published_at: str  # ISO 8601 UTC, from the storage's modification time of the manifest
    aliases: tuple[str, ...] = ()
    seq: int = 0  # publish order within the name (0: published before sequence numbers existed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "published_at": self.published_at,
            "aliases": list(self.aliases),
            "seq": self.seq,
        }


@dataclass(frozen=True)
class StoreEvent:
    """A change seen by a subscriber.

    kind: ``version_published``, ``version_deleted``, ``alias_moved`` (``previous`` is None when the alias is new)
    or ``alias_removed`` (``version`` is None, ``previous`` the old target); with a changing set of names watched,
    ``watch_started`` when a name joins it (its state then is its baseline: a watcher that looked the name up
    before the subscription did should look again). For alias events ``seq`` is the
    alias's move counter and ``missed`` how many moves happened between two polls without being seen (an
    A→B→A flip inside one interval arrives as one ``alias_moved`` A→A with ``missed=1``).
    """

    kind: str
    name: str
    alias: str | None = None
    version: str | None = None
    previous: str | None = None
    seq: int | None = None
    missed: int = 0


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class PackStore:
    """Pack versions and aliases on one backend."""

    def __init__(self, backend: Backend):
        self.backend = backend

    @property
    def url(self) -> str:
        return self.backend.url

    def __repr__(self) -> str:
        return f"PackStore({self.url!r})"

    # ----------------------------------------------------------------- publish

    def publish(self, pack: PackContents, signing_key: Any = None) -> str:
        """Store ``pack`` as ``<name>/<version>``; returns the version. Idempotent; atomic; re-validates first.

        Every file is read back through the loader before the version becomes visible; an already published
        version is read back too, so success always means "this ref loads". ``signing_key``: an ed25519 private
        key (``edits_store.signing.load_private_key``) to sign the version with (ignored if it already exists).
        """
        m = pack.manifest
        if compute_version(m) != m.version:
            raise SchemaError(
                f"manifest version {m.version} is not its content hash {compute_version(m)}; "
                "build packs with build_pack",
                pack=m.ref,
                file=MANIFEST_FILE,
                check="version",
            )
        validate_tensors(
            pack.token_ids,
            pack.sense_ids,
            pack.deltas,
            n=m.n_senses_edited,
            d_model=m.d_model,
            vocab_size=m.vocab_size,
            num_senses=m.num_senses,
            pack=m.ref,
            file=None,
        )
        files = pack_files(pack)
        trusted = None
        if signing_key is not None:
            from .signing import public_raw_of, sign

            manifest_bytes = files.pop(MANIFEST_FILE)
            files[SIGNATURE_FILE] = sign(signing_key, name=m.name, digest=content_digest(m))
            files[MANIFEST_FILE] = manifest_bytes  # still last: the commit marker
            trusted = (public_raw_of(signing_key),)

        def verify(src: PackFiles, manifest_bytes: bytes) -> None:
            expect = Expectations(trusted_keys=trusted) if trusted else None
            load_from_source(
                src, expect=expect, expect_name=m.name, expect_version=m.version, manifest_bytes=manifest_bytes
            )

        # Always through the backend's writer: on S3 it waits out a deletion in progress before deciding that
        # the version "already exists", so a no-op never reports a version that is being deleted.
        created = self.backend.commit_version(m.name, m.version, files, verify)
        if not created:
            self.load(f"{m.name}@{m.version}")  # already there: it must load too
        log.info(
            "event=%s pack=%s store=%s bytes=%d signed=%s",
            "publish" if created else "publish_noop",
            m.ref,
            self.url,
            sum(map(len, files.values())),
            trusted is not None,
        )
        return m.version

    # ----------------------------------------------------------------- resolve / load

    def resolve(self, ref: str) -> tuple[str, str]:
        """Reference → (name, version) of a committed version; PackNotFoundError if there is none."""
        parsed = parse_pack_reference(ref)
        name, selector = parsed.name, parsed.selector
        if selector is None:
            if self._read_alias(name, DEFAULT_ALIAS) is not None:
                selector = DEFAULT_ALIAS
            else:
                return name, self._latest(name)
        if VERSION_RE.match(selector):
            if not self.backend.version_committed(name, selector):
                raise PackNotFoundError(f"version {selector} does not exist", pack=f"{name}@{selector}", check="exists")
            return name, selector
        if selector == LATEST:
            return name, self._latest(name)
        check_alias_name(name, selector)
        target = self._read_alias(name, selector)
        if target is None:
            raise PackNotFoundError(f"alias {selector!r} is not set", pack=f"{name}@{selector}", check="alias")
        if not self.backend.version_committed(name, target):
            raise PackNotFoundError(
                f"alias {selector!r} points to version {target}, which no longer exists",
                pack=f"{name}@{selector}",
                check="alias_target",
            )
        return name, target

    def _latest(self, name: str) -> str:
        ordered = self._ordered_versions(name)
        if not ordered:
            raise PackNotFoundError("no published version", pack=name, check="exists")
        return ordered[-1][0]

    def _ordered_versions(self, name: str) -> list[tuple[str, float, int]]:
        """Committed versions oldest → newest published: (version, manifest mtime, seq).

        Ordered by the sequence number claimed at publish (one listing, no per-version reads); versions from
        before sequence numbers (seq 0) come first, by mtime. A touched manifest does not change the order.
        """
        versions = self.backend.list_versions(name)
        seqs = self.backend.list_seqs(name)
        rows = [(v, t, seqs.get(v, 0)) for v, t in versions.items()]
        return sorted(rows, key=lambda r: (r[2], r[1] if r[2] == 0 else 0.0, r[0]))

    def load(self, ref: str, expect: Expectations | None = None) -> PackContents:
        """Resolve and read one version with full validation (hashes, tensors, fingerprints, β)."""
        name, version = self.resolve(ref)
        src = self.backend.source(name, version)
        try:
            pack = load_from_source(src, expect=expect, expect_name=name, expect_version=version)
        except (MissingFileError, PackNotFoundError):
            if not self.backend.version_committed(name, version):
                raise PackNotFoundError(
                    "version was deleted while being read", pack=f"{name}@{version}", check="exists"
                ) from None
            raise
        except PackError as exc:
            log.warning(
                "event=load_refused pack=%s@%s store=%s error=%s check=%s",
                name,
                version,
                self.url,
                type(exc).__name__,
                exc.check,
            )
            raise
        log.info("event=load pack=%s store=%s n=%d", pack.ref, self.url, pack.manifest.n_senses_edited)
        return pack

    # ----------------------------------------------------------------- listing

    def list_packs(self) -> list[str]:
        """Names with at least one committed version or alias."""
        return sorted(self.backend.scan())

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Committed versions, oldest published first, each with the aliases pointing to it."""
        by_version: dict[str, list[str]] = {}
        for alias, version in self.aliases(name).items():
            by_version.setdefault(version, []).append(alias)
        return [
            VersionInfo(name, v, _iso(t), tuple(sorted(by_version.get(v, ()))), seq)
            for v, t, seq in self._ordered_versions(name)
        ]

    def aliases(self, name: str) -> dict[str, str]:
        """alias → version for ``name`` (dangling aliases included; ``resolve`` refuses them)."""
        out = {}
        for alias, data in self.backend.list_aliases(name).items():
            out[alias] = self._parse_alias(name, alias, data)
        return dict(sorted(out.items()))

    def _read_alias(self, name: str, alias: str) -> str | None:
        data = self.backend.read_alias(name, alias)
        return None if data is None else self._parse_alias(name, alias, data)

    @staticmethod
    def _alias_doc(name: str, alias: str, data: bytes) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(data)
            version = doc["version"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise AliasError(
                "alias document is not valid JSON with a 'version'",
                pack=f"{name}@{alias}",
                file=f"_aliases/{alias}.json",
                check="alias_json",
            ) from None
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise AliasError(
                f"alias points to malformed version {version!r:.80}",
                pack=f"{name}@{alias}",
                file=f"_aliases/{alias}.json",
                check="alias_json",
            )
        return doc

    @classmethod
    def _parse_alias(cls, name: str, alias: str, data: bytes) -> str:
        version: str = cls._alias_doc(name, alias, data)["version"]
        return version

    @classmethod
    def _alias_seq(cls, name: str, alias: str, data: bytes | None) -> int:
        try:
            seq = cls._alias_doc(name, alias, data).get("seq", 0) if data is not None else 0
        except AliasError:
            return 0
        return seq if type(seq) is int and seq >= 0 else 0

    @classmethod
    def alias_target(cls, name: str, alias: str, data: bytes) -> tuple[str, int]:
        """An alias document's (version, move counter); AliasError when the document is malformed."""
        return cls._parse_alias(name, alias, data), cls._alias_seq(name, alias, data)

    # ----------------------------------------------------------------- aliases

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, Any]:
        """Point ``name@alias`` at a committed ``version`` (atomic flip; PackNotFoundError if it does not exist).

        The alias document carries a move counter ``seq``; the move is also appended to the alias history.
        Concurrent movers on S3 are serialised by conditional writes (a loser retries on the new state).
        """
        check_alias_name(name, alias)
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise InvalidReferenceError(
                f"{version!r} is not a version (32 hex chars); resolve references first", pack=name, check="ref_syntax"
            )
        doc = self._move_alias(name, alias, version)
        log.info(
            "event=alias_set pack=%s alias=%s version=%s previous=%s seq=%d store=%s",
            name,
            alias,
            version,
            doc["previous"],
            doc["seq"],
            self.url,
        )
        return doc

    def _move_alias(self, name: str, alias: str, version: str | None) -> dict[str, Any]:
        """Set (``version``) or remove (None) an alias with compare-and-swap, then record it in the history."""
        for _ in range(ALIAS_RETRIES):
            with self.backend.lock(name):
                if version is not None and not self.backend.version_committed(name, version):
                    raise PackNotFoundError(
                        f"cannot point alias {alias!r} at missing version {version}",
                        pack=f"{name}@{version}",
                        check="exists",
                    )
                try:
                    return self._move_alias_locked(name, alias, version)
                except (ConcurrentUpdateError, FileExistsError):
                    continue  # another mover won this round: retry on the state it left
        raise ConcurrentUpdateError(
            f"alias kept changing during {ALIAS_RETRIES} attempts", pack=f"{name}@{alias}", check="alias_cas"
        )

    def _move_alias_locked(self, name: str, alias: str, version: str | None) -> dict[str, Any]:
        """One attempt, under ``backend.lock(name)`` where the backend has one (CAS on S3 otherwise)."""
        current = self.backend.read_alias(name, alias)
        if version is None and current is None:
            raise PackNotFoundError(f"alias {alias!r} is not set", pack=f"{name}@{alias}", check="alias")
        previous = self._read_alias_lenient(name, alias, current)
        last_logged = max(
            (self._alias_seq(name, alias, d) for d in self.backend.list_history(name).get(alias, [])), default=0
        )
        seq = max(self._alias_seq(name, alias, current), last_logged) + 1
        doc = {
            "name": name,
            "alias": alias,
            "version": version,
            "previous": previous,
            "seq": seq,
            "updated_at": utc_now_iso(),
            "by": _who(),
        }
        data = json.dumps(doc, sort_keys=True).encode("utf-8")
        if version is None:
            if not self.backend.remove_alias(name, alias):
                raise ConcurrentUpdateError("alias vanished", pack=f"{name}@{alias}", check="alias_cas")
        else:
            self.backend.write_alias(name, alias, data, expect=current)
        self.backend.append_history(name, alias, seq, data)
        return doc

    def _read_alias_lenient(self, name: str, alias: str, data: bytes | None = None) -> str | None:
        try:
            return None if data is None else self._parse_alias(name, alias, data)
        except AliasError:
            return None  # a corrupt alias is being overwritten: that is the repair

    def remove_alias(self, name: str, alias: str) -> None:
        check_alias_name(name, alias)
        self._move_alias(name, alias, None)
        log.info("event=alias_removed pack=%s alias=%s store=%s", name, alias, self.url)

    def history(self, name: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Alias moves of ``name`` (every alias, or one), oldest first per alias: who/when/from/to and ``seq``.

        Append-only; a mover killed between its alias write and its history append leaves a gap in ``seq``."""
        out = []
        for a, docs in sorted(self.backend.list_history(name).items()):
            if alias is not None and a != alias:
                continue
            for data in docs:
                try:
                    doc = json.loads(data)
                except ValueError:
                    continue
                out.append(
                    {
                        "alias": a,
                        "seq": doc.get("seq"),
                        "from": doc.get("previous"),
                        "to": doc.get("version"),
                        "at": doc.get("updated_at"),
                        "by": doc.get("by"),
                    }
                )
        return out

    # ----------------------------------------------------------------- deletion / retention

    def delete_version(self, name: str, version: str, force: bool = False) -> None:
        """Delete a version. RetentionError if an alias points to it, unless ``force`` (which drops those aliases)."""
        if not VERSION_RE.match(version or ""):
            raise InvalidReferenceError(f"{version!r} is not a version", pack=name, check="ref_syntax")
        with self.backend.lock(name):
            if not self.backend.version_committed(name, version):
                raise PackNotFoundError("no such version", pack=f"{name}@{version}", check="exists")
            holders = sorted(a for a, v in self.aliases(name).items() if v == version)
            if holders and not force:
                raise RetentionError(
                    f"aliases {holders} point to this version; move them or use force",
                    pack=f"{name}@{version}",
                    check="retention",
                )
            for alias in holders:
                self._move_alias_locked(name, alias, None)  # logged in the alias history like any removal
            self.backend.remove_version(name, version)
        log.info(
            "event=version_deleted pack=%s@%s force=%s dropped_aliases=%s store=%s",
            name,
            version,
            force,
            ",".join(holders) or "-",
            self.url,
        )

    def prune(self, name: str, keep: int) -> list[str]:
        """Delete all but the ``keep`` most recently published un-aliased versions (aliased ones always stay)."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        free = [i for i in self.list_versions(name) if not i.aliases]  # oldest first
        doomed = free[: len(free) - keep] if keep else free
        deleted = []
        for info in doomed:
            try:
                self.delete_version(name, info.version)
                deleted.append(info.version)
            except (RetentionError, PackNotFoundError):
                continue  # an alias moved onto it meanwhile, or someone else deleted it
        return deleted

    def gc(self, older_than_s: float = DEFAULT_GC_AGE_S) -> list[str]:
        """Remove invisible leftovers of killed publishers older than ``older_than_s`` seconds."""
        return self.backend.gc(older_than_s)

    # ----------------------------------------------------------------- notifications

    def subscribe(
        self,
        callback: Callable[[StoreEvent], Any],
        interval_s: float = 1.0,
        names: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    ) -> Subscription:
        """Poll the store every ``interval_s`` and call ``callback`` for each change (in a background thread).

        The state at subscription time is the baseline (no events for it). Works identically on every backend;
        callback exceptions are logged and do not stop the subscription. ``names`` limits it to those packs, and
        each poll then lists only them (a store of thousands costs what the watched names cost); a callable is
        asked again at every poll, for a set that changes (a server watches the names it serves).
        """
        return Subscription(self, callback, interval_s, names if names is None or callable(names) else set(names))


class Subscription:
    """A polling watcher; ``close()`` stops it. Also usable as a context manager."""

    def __init__(
        self,
        store: PackStore,
        callback: Callable[[StoreEvent], Any],
        interval_s: float,
        names: set[str] | Callable[[], Iterable[str]] | None,
    ):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.store = store
        self.callback = callback
        self.interval_s = interval_s
        self.names = names
        self._stop = threading.Event()
        self._alias_cache: dict[tuple[str, str], tuple[Any, tuple[str, int] | None]] = {}
        self._watching = self._watched()
        self._state = self._snapshot(self._watching)
        self._thread = threading.Thread(target=self._run, name="pack-store-subscription", daemon=True)
        self._thread.start()

    def _watched(self) -> set[str] | None:
        """The names watched now (None: all)."""
        if callable(self.names):
            return set(self.names())
        return self.names

    def _snapshot(self, names: set[str] | None) -> dict[str, tuple[set[str], dict[str, tuple[str, int]]]]:
        """name → (versions, alias → (version, move seq)); alias files are re-read only when their token changed."""
        scan: dict[str, NameScan] = self.store.backend.scan(names)
        state = {}
        for name, ns in scan.items():
            if names is not None and name not in names:
                continue
            aliases = {}
            for alias, token in ns.alias_tokens.items():
                cached = self._alias_cache.get((name, alias))
                if cached is None or cached[0] != token:
                    data = self.store.backend.read_alias(name, alias)
                    try:
                        target = None if data is None else self.store.alias_target(name, alias, data)
                    except AliasError:
                        target = None
                    cached = (token, target)
                    self._alias_cache[(name, alias)] = cached
                if cached[1] is not None:
                    aliases[alias] = cached[1]
            state[name] = (set(ns.versions), aliases)
        return state

    @staticmethod
    def diff(old: dict[str, Any], new: dict[str, Any]) -> list[StoreEvent]:
        events = []
        for name in sorted(set(old) | set(new)):
            old_versions, old_aliases = old.get(name, (set(), {}))
            new_versions, new_aliases = new.get(name, (set(), {}))
            events += [StoreEvent("version_published", name, version=v) for v in sorted(new_versions - old_versions)]
            for alias in sorted(set(old_aliases) | set(new_aliases)):
                before, after = old_aliases.get(alias), new_aliases.get(alias)
                before_seq = before[1] if before is not None else 0
                if after is not None and after != before:
                    # seq counts every move (removals too): a jump > 1 means moves this poll did not see
                    missed = max(0, after[1] - before_seq - 1) if after[1] else 0
                    events.append(
                        StoreEvent(
                            "alias_moved",
                            name,
                            alias=alias,
                            version=after[0],
                            previous=before[0] if before else None,
                            seq=after[1] or None,
                            missed=missed,
                        )
                    )
                elif after is None and before is not None:
                    events.append(StoreEvent("alias_removed", name, alias=alias, previous=before[0]))
            events += [StoreEvent("version_deleted", name, version=v) for v in sorted(old_versions - new_versions)]
        return events

    def poll(self) -> list[StoreEvent]:
        """One look at the store: the events since the last (the thread calls it every ``interval_s``). A name
        that joined the watched set starts from its state now (a ``watch_started`` event, no others for what
        was there); one that left it is forgotten."""
        watching = self._watched()
        new_state = self._snapshot(watching)
        old, started = self._state, []
        if watching is not None and self._watching is not None:
            started = sorted(watching - self._watching)
            old = {n: s for n, s in old.items() if n in watching}
            for n in started:
                if n in new_state:
                    old[n] = new_state[n]
        events = [StoreEvent("watch_started", n) for n in started] + self.diff(old, new_state)
        self._watching, self._state = watching, new_state
        return events

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                events = self.poll()
            except Exception:  # storage hiccup: keep the old baseline and try again
                log.exception("event=subscription_poll_failed store=%s", self.store.url)
                continue
            for event in events:
                if self._stop.is_set():
                    return
                log.info(
                    "event=store_change kind=%s pack=%s alias=%s version=%s previous=%s",
                    event.kind,
                    event.name,
                    event.alias,
                    event.version,
                    event.previous,
                )
                try:
                    self.callback(event)
                except Exception:
                    log.exception("event=subscriber_callback_failed kind=%s pack=%s", event.kind, event.name)

    def close(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- open_store


def _s3_filesystem(storage_options: dict[str, Any]) -> Any:
    import fsspec

    opts = dict(storage_options)
    endpoint = (
        opts.pop("endpoint_url", None)
        or os.environ.get("SENSEPACK_S3_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        opts["endpoint_url"] = endpoint
    opts.setdefault("use_listings_cache", False)  # a cached listing would hide new versions and aliases
    opts.setdefault("skip_instance_cache", True)
    return fsspec.filesystem("s3", **opts)


def open_store(url: str | os.PathLike[str], *, create: bool = True, **storage_options: Any) -> PackStore:
    """``/path``, ``relative/path`` or ``file:///path`` → local directory; ``s3://bucket/prefix`` → S3 via fsspec
    (``endpoint_url`` from kwargs, ``SENSEPACK_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``;
    credentials the usual AWS way); any other ``proto://`` → that fsspec filesystem. ``create=False``: a local
    directory that does not exist is a PackNotFoundError (check ``store_exists``), not a new empty store."""
    url = os.fspath(url)
    if "://" not in url:
        return PackStore(LocalBackend(url, create=create))
    protocol, _, rest = url.partition("://")
    if protocol == "file":
        return PackStore(LocalBackend("/" + rest.lstrip("/"), create=create))
    if protocol in ("s3", "s3a"):
        if not rest.strip("/"):
            raise InvalidReferenceError(f"store url {url!r} names no bucket", check="store_url")
        fs = _s3_filesystem(storage_options)
        bucket = rest.strip("/").split("/", 1)[0]
        if not create and not fs.exists(bucket):  # a prefix cannot be checked: an empty one is a new store
            raise PackNotFoundError(f"no bucket {bucket!r} at this endpoint (a typo?)", pack=url, check="store_exists")
        return PackStore(FsspecBackend(fs, rest.strip("/"), url))
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    return PackStore(FsspecBackend(fs, root, url))


__all__ = [
    "DEFAULT_ALIAS",
    "LATEST",
    "PackReference",
    "PackStore",
    "StoreEvent",
    "Subscription",
    "VersionInfo",
    "open_store",
    "parse_pack_reference",
]
