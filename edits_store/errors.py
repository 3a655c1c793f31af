"""Errors raised by the edit-pack store.

Every refusal is a ``PackError`` that names the pack, the file and the check
that failed, so an operator (or the server's status message) can say exactly
why a pack was not served. ``status`` is the gRPC status name the server should
map the error to; it is a plain string so this package needs no gRPC import.
"""

from __future__ import annotations

from typing import Any


class PackError(Exception):
    """Base class: a pack or store operation was refused.

    Attributes:
        pack:  the pack (``name`` or ``name@version``, or a folder) concerned, if known.
        file:  the file inside the pack that failed (``manifest.json``, ``senses.safetensors``), if any.
        check: a short machine-readable name of the failed check (``sha256``, ``shape``, ...).
        detail: the human explanation without the pack/file/check prefix.
    """

    status = "INVALID_ARGUMENT"

    def __init__(self, detail: str, *, pack: str | None = None, file: str | None = None, check: str | None = None):
        self.detail = detail
        self.pack = pack
        self.file = file
        self.check = check
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.pack is not None:
            where.append(f"pack {self.pack}")
        if self.file is not None:
            where.append(f"file {self.file}")
        if self.check is not None:
            where.append(f"check {self.check}")
        prefix = ", ".join(where)
        return f"{type(self).__name__}: {prefix}: {self.detail}" if prefix else f"{type(self).__name__}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for CLIs and admin APIs."""
        return {
            "error": type(self).__name__,
            "pack": self.pack,
            "file": self.file,
            "check": self.check,
            "detail": self.detail,
            "status": self.status,
        }


class SchemaError(PackError):
    """manifest.json is missing, not JSON, has a wrong schema version, or a missing/extra/invalid field."""


class MissingFileError(PackError):
    """A file the manifest lists (or the manifest itself) is absent from the pack folder."""


class HashMismatchError(PackError):
    """A file's sha256 differs from the manifest, or the version is not the content hash."""


class TruncatedFileError(HashMismatchError):
    """A file is shorter than its own header declares (a cut-off copy or write)."""


class TensorFormatError(PackError):
    """senses.safetensors has the wrong tensor names, dtypes or shapes, or is not valid safetensors."""


class DuplicatePairError(PackError):
    """The same (token, sense) pair appears more than once."""


class TokenIdRangeError(PackError):
    """A token id is negative or not below the vocabulary size."""


class SenseIdRangeError(PackError):
    """A sense id is negative or not below the Backpack's sense count."""


class NonFiniteError(PackError):
    """A delta contains NaN or Inf."""


class IncompatiblePackError(PackError):
    """The pack was trained against a different Backpack, tokenizer or model width than the one served."""

    status = "FAILED_PRECONDITION"


class MissingBetaError(PackError):
    """The pack has no calibrated beta for the target model being served."""

    status = "FAILED_PRECONDITION"


class PackNotFoundError(PackError):
    """No such pack, version or alias (or it was deleted while being read)."""

    status = "NOT_FOUND"


class InvalidReferenceError(PackError):
    """A pack reference (``name``, ``name@version``, ``name@alias``) is malformed."""


class AliasError(PackError):
    """An alias name is invalid, or an alias file is unreadable."""


class RetentionError(PackError):
    """A version an alias points to cannot be deleted without force."""

    status = "FAILED_PRECONDITION"


class UnsafeFileError(PackError):
    """A pack file or folder is not a regular file/directory inside the store (a FIFO, a device, a symlink), or is
    larger than the schema allows; refused before it is read, so it can neither hang nor exhaust memory."""


class SignatureError(PackError):
    """The pack is unsigned, signed by a key that is not trusted, or its signature does not verify."""

    status = "PERMISSION_DENIED"


class ConcurrentUpdateError(PackError):
    """Another writer changed the same object first (a conditional write failed) or held it too long; retry."""

    status = "ABORTED"


class StoreIOError(PackError):
    """The storage refused an operation (disk full, read-only store, permission denied, I/O error)."""

    status = "UNAVAILABLE"


__all__ = [
    "AliasError",
    "ConcurrentUpdateError",
    "DuplicatePairError",
    "HashMismatchError",
    "IncompatiblePackError",
    "InvalidReferenceError",
    "MissingBetaError",
    "MissingFileError",
    "NonFiniteError",
    "PackError",
    "PackNotFoundError",
    "RetentionError",
    "SchemaError",
    "SenseIdRangeError",
    "SignatureError",
    "StoreIOError",
    "TensorFormatError",
    "TokenIdRangeError",
    "TruncatedFileError",
    "UnsafeFileError",
]
