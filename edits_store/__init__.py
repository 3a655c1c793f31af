"""sensepack edit-pack store: pack format, validation, fingerprints, versioned store, aliases, notifications.

Imports only the stdlib, torch (tensors), safetensors, fsspec, pydantic (click for ``edits_store.cli``,
cryptography for ``edits_store.signing``);
never ``ensemble``, ``train_edits`` or ``serve`` (DESIGN §2).
"""

from .errors import (
    AliasError,
    ConcurrentUpdateError,
    DuplicatePairError,
    HashMismatchError,
    IncompatiblePackError,
    InvalidReferenceError,
    MissingBetaError,
    MissingFileError,
    NonFiniteError,
    PackError,
    PackNotFoundError,
    RetentionError,
    SchemaError,
    SenseIdRangeError,
    SignatureError,
    StoreIOError,
    TensorFormatError,
    TokenIdRangeError,
    TruncatedFileError,
    UnsafeFileError,
)
from .format import (
    SCHEMA_VERSION,
    CalibrationEntry,
    Expectations,
    Manifest,
    PackContents,
    build_pack,
    read_pack,
    with_calibration,
    write_pack,
)
from .store import PackStore, StoreEvent, Subscription, VersionInfo, open_store

__all__ = [
    "SCHEMA_VERSION", "CalibrationEntry", "Expectations", "Manifest", "PackContents", "build_pack", "read_pack",
    "with_calibration", "write_pack", "PackStore", "StoreEvent", "Subscription", "VersionInfo", "open_store",
    "PackError", "SchemaError", "MissingFileError", "HashMismatchError", "TruncatedFileError", "TensorFormatError",
    "DuplicatePairError", "TokenIdRangeError", "SenseIdRangeError", "NonFiniteError", "IncompatiblePackError",
    "MissingBetaError", "PackNotFoundError", "InvalidReferenceError", "AliasError", "RetentionError",
    "UnsafeFileError", "SignatureError", "ConcurrentUpdateError", "StoreIOError",
]
