"""sensepack edit-pack store: pack format, validation, fingerprints, versioned store, aliases, notifications.

Imports only the stdlib, torch (tensors), safetensors, fsspec, pydantic (and click for ``edits_store.cli``);
never ``ensemble``, ``train_edits`` or ``serve`` (DESIGN §2).
"""

from .errors import (
    AliasError,
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
    TensorFormatError,
    TokenIdRangeError,
    TruncatedFileError,
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
]
