"""The interface every backend implements, the layout's names and the helpers both backends share."""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..format import VERSION_RE, PackFiles

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


def seq_entry(seq: int, version: str) -> str:
    return f"{seq:012d}-{version}"


def parse_seq_entry(leaf: str) -> tuple[int, str] | None:
    seq, _, version = leaf.partition("-")
    if len(seq) == 12 and seq.isdigit() and VERSION_RE.match(version):
        return int(seq), version
    return None


def etag(data: bytes) -> str:
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
    def scan(self, names: Iterable[str] | None = None) -> dict[str, NameScan]:
        """Every pack name (or only `names`: where it is cheaper, a listing per name instead of the whole store)
        with its committed versions and alias tokens (a token changes when the alias file does); names with
        neither are left out."""

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
