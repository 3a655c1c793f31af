"""Edit-pack format (DESIGN §3): ``senses.safetensors`` + ``manifest.json``.

A pack version is named by its content: ``version`` is the first 32 hex chars (128 bits) of the sha256 of the
canonical JSON (sorted keys, no whitespace, RFC 8785-style) of the manifest *as parsed from its file*, minus
``version`` and ``created_at``. The manifest records the sha256 of ``senses.safetensors``, so the version
covers the tensors, the Backpack/tokenizer fingerprints, the calibration entries and the training/evaluation
records byte for byte: the hash is taken over the parsed file, not over a model's re-serialisation, so NaN,
Infinity, 1e400 (→ inf) and duplicate keys are refused instead of silently collapsing to one value.

Reading is one pipeline; every failure is a typed ``PackError`` naming the check (first failure wins):
bounded read of manifest.json (regular file, no symlink, ≤ 1 MiB) → strict JSON (depth, duplicates,
non-finite numbers) → schema version → fields → version = content hash → the tensor file (the only file a
manifest may list): bounded read (regular file, no symlink, size ≤ the cap implied by the declared n × d)
hashed while it is read → sha256 (truncation diagnosed separately) → only then parse: safetensors header,
tensor names, dtypes, shapes → NaN/Inf → token/sense id ranges → unique pairs → signature (when the caller
trusts keys) → the expectations of the caller (Backpack/tokenizer fingerprints, width, β for the served target
model).

Reading is tuned for the serving hot path: the tensor file is read once into one buffer while a second thread
hashes the chunks already read (hashlib releases the GIL); that thread is joined before the read returns, on
every path. The tensors are zero-copy views of that buffer.
"""

from __future__ import annotations

from .pack_format.bounded_io import PackFiles, fsync_dir
from .pack_format.contents import (
    Expectations,
    PackContents,
    build_pack,
    describe,
    pack_files,
    replace_fields,
    with_calibration,
    write_pack,
)
from .pack_format.load import check_expectations, load_from_source, read_pack
from .pack_format.manifest import (
    MANIFEST_FILE,
    NAME_RE,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    TENSOR_FILE,
    VERSION_RE,
    CalibrationEntry,
    Manifest,
    canonical_json,
    compute_version,
    content_digest,
    parse_manifest,
    utc_now_iso,
)
from .pack_format.tensors import validate_tensors

__all__ = [
    "MANIFEST_FILE",
    "NAME_RE",
    "SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "TENSOR_FILE",
    "VERSION_RE",
    "CalibrationEntry",
    "Expectations",
    "Manifest",
    "PackContents",
    "PackFiles",
    "build_pack",
    "canonical_json",
    "check_expectations",
    "compute_version",
    "content_digest",
    "describe",
    "fsync_dir",
    "load_from_source",
    "pack_files",
    "parse_manifest",
    "read_pack",
    "replace_fields",
    "utc_now_iso",
    "validate_tensors",
    "with_calibration",
    "write_pack",
]
