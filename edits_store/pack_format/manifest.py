"""The manifest (schema, fields) and the content hash that names a version: canonical JSON of the manifest
as parsed from its file, minus ``version`` and ``created_at``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import (
    MissingBetaError,
    SchemaError,
)
from .strict_json import strict_json_loads

log = logging.getLogger("edits_store.format")


SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSOR_FILE = "senses.safetensors"
SIGNATURE_FILE = "signature.json"  # beside the manifest, not listed in it: a signature is about the content
TENSOR_NAMES = ("token_ids", "sense_ids", "deltas")
VERSION_LENGTH = 32  # hex chars: 128 bits of sha256

# \A...\Z, not ^...$: "$" also matches before a trailing newline, which let "demo\n" through.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
VERSION_RE = re.compile(r"\A[0-9a-f]{32}\Z")
SHA256_HEX_RE = re.compile(r"\A[0-9a-f]{64}\Z")

# Read caps: a file larger than its cap is refused before a byte of it is read.
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096


def _non_empty(value: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty string")
    return value


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}")
    return value


class CalibrationEntry(BaseModel):
    """β calibrated for one target (large) model, with the ball measurement that justified it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    target_model: str
    target_fingerprint: str
    beta: float
    ball_ratio: float
    g_fingerprint: str
    g_tokens: int
    epsilon: float

    @field_validator("target_model", "target_fingerprint", "g_fingerprint")
    @classmethod
    def _strings(cls, v: str, info: ValidationInfo) -> str:
        return _non_empty(v, str(info.field_name))

    @field_validator("beta", "ball_ratio", "epsilon")
    @classmethod
    def _floats(cls, v: float, info: ValidationInfo) -> float:
        return _finite(v, str(info.field_name))

    @field_validator("g_tokens")
    @classmethod
    def _tokens(cls, v: int) -> int:
        if v < 0:
            raise ValueError("g_tokens must be >= 0")
        return v


class Manifest(BaseModel):
    """manifest.json of one pack version (schema version 1). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: int
    name: str
    version: str
    created_at: str
    backpack: dict[str, str]
    tokenizer_fingerprint: str
    vocab_size: int
    num_senses: int
    d_model: int
    n_senses_edited: int
    epsilon: float
    calibration: list[CalibrationEntry]
    training: dict[str, Any]
    evaluation: dict[str, Any]
    files: dict[str, str]

    @field_validator("schema_version")
    @classmethod
    def _schema(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {v}; this reader understands {SCHEMA_VERSION}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"pack name {v!r} must match {NAME_RE.pattern}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not VERSION_RE.match(v):
            raise ValueError(f"version {v!r} must be {VERSION_LENGTH} lowercase hex chars")
        return v

    @field_validator("created_at")
    @classmethod
    def _created_at(cls, v: str) -> str:
        try:
            parsed = datetime.fromisoformat(v)
        except ValueError as exc:
            raise ValueError(f"created_at {v!r} is not ISO 8601") from exc
        offset = parsed.utcoffset()
        if offset is None or offset.total_seconds() != 0:
            raise ValueError(f"created_at {v!r} must be UTC")
        return v

    @field_validator("backpack")
    @classmethod
    def _backpack(cls, v: dict[str, str]) -> dict[str, str]:
        if set(v) != {"name", "fingerprint"}:
            raise ValueError(f"backpack must have exactly the keys 'name' and 'fingerprint', got {sorted(v)}")
        _non_empty(v["name"], "backpack.name")
        _non_empty(v["fingerprint"], "backpack.fingerprint")
        return v

    @field_validator("tokenizer_fingerprint")
    @classmethod
    def _tok(cls, v: str) -> str:
        return _non_empty(v, "tokenizer_fingerprint")

    @field_validator("vocab_size", "num_senses", "d_model")
    @classmethod
    def _positive(cls, v: int, info: ValidationInfo) -> int:
        if v <= 0:
            raise ValueError(f"{info.field_name} must be > 0")
        return v

    @field_validator("n_senses_edited")
    @classmethod
    def _count(cls, v: int) -> int:
        if v < 0:
            raise ValueError("n_senses_edited must be >= 0")
        return v

    @field_validator("epsilon")
    @classmethod
    def _eps(cls, v: float) -> float:
        _finite(v, "epsilon")
        if v < 0:
            raise ValueError("epsilon must be >= 0")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        # Exactly the tensor file: the store writes what a pack holds, so a manifest listing anything else
        # would publish a version that can never load.
        if set(v) != {TENSOR_FILE}:
            raise ValueError(f"files must list exactly {TENSOR_FILE!r}, got {sorted(v)!r}")
        for fname, digest in v.items():
            if not isinstance(digest, str) or not SHA256_HEX_RE.match(digest):
                raise ValueError(f"files[{fname!r}] must be a 64-char lowercase sha256 hex digest")
        return v

    @model_validator(mode="after")
    def _unique_targets(self) -> Manifest:
        seen: set[str] = set()
        for entry in self.calibration:
            if entry.target_fingerprint in seen:
                raise ValueError(f"calibration has two entries for target {entry.target_fingerprint}")
            seen.add(entry.target_fingerprint)
        return self

    def beta_for(self, target_fingerprint: str) -> CalibrationEntry:
        """The calibration entry for the served target model; MissingBetaError if never calibrated for it."""
        for entry in self.calibration:
            if entry.target_fingerprint == target_fingerprint:
                return entry
        known = [f"{e.target_model} ({e.target_fingerprint})" for e in self.calibration] or ["none"]
        raise MissingBetaError(
            f"no beta calibrated for target model {target_fingerprint}; calibrated targets: {', '.join(known)}",
            pack=f"{self.name}@{self.version}",
            file=MANIFEST_FILE,
            check="beta_for_target",
        )

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace, NaN refused): the input of the content hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def content_digest(manifest: Manifest | Mapping[str, Any]) -> str:
    """Full sha256 hex of the canonical manifest minus ``version`` and ``created_at`` (what a signature signs).

    A ``Mapping`` is the manifest as parsed from its file (byte-exact); a ``Manifest`` is re-dumped, which is the
    same thing for manifests this package wrote (``pack_files`` checks it).
    """
    body = manifest.model_dump(mode="json") if isinstance(manifest, Manifest) else dict(manifest)
    body.pop("version", None)
    body.pop("created_at", None)
    return hashlib.sha256(canonical_json(body)).hexdigest()


def compute_version(manifest: Manifest | Mapping[str, Any]) -> str:
    """Content version: the first 32 hex chars (128 bits) of ``content_digest``."""
    return content_digest(manifest)[:VERSION_LENGTH]


def manifest_to_bytes(manifest: Manifest) -> bytes:
    """Human-readable manifest.json bytes (indented, sorted keys)."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True, allow_nan=False)
    return (text + "\n").encode("utf-8")


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def schema_error_detail(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "missing":
            parts.append(f"missing field '{loc}'")
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        else:
            parts.append(f"field '{loc}': {err['msg']}")
    return "; ".join(parts)


def parse_manifest_raw(data: bytes, *, source: str) -> tuple[Manifest, dict[str, Any]]:
    """Parse and schema-check manifest.json bytes: (Manifest, the parsed JSON object the version is hashed from).

    SchemaError names the field that is missing or wrong (check ``size``, ``json``, ``schema_version``, ``schema``).
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise SchemaError(
            f"manifest has {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} allowed",
            pack=source,
            file=MANIFEST_FILE,
            check="size",
        )
    try:
        raw = strict_json_loads(data)
    except ValueError as exc:
        raise SchemaError(
            f"manifest is refused as JSON: {exc}; the file may be truncated or tampered with",
            pack=source,
            file=MANIFEST_FILE,
            check="json",
        ) from None
    if not isinstance(raw, dict):
        raise SchemaError("manifest must be a JSON object", pack=source, file=MANIFEST_FILE, check="json")
    if "schema_version" not in raw:
        raise SchemaError("missing field 'schema_version'", pack=source, file=MANIFEST_FILE, check="schema_version")
    if type(raw["schema_version"]) is not int or raw["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(
            f"unsupported schema_version {raw['schema_version']!r}; this reader understands "
            f"{SCHEMA_VERSION} (a newer sensepack may have written it)",
            pack=source,
            file=MANIFEST_FILE,
            check="schema_version",
        )
    try:
        return Manifest.model_validate(raw), raw
    except ValidationError as exc:
        raise SchemaError(schema_error_detail(exc), pack=source, file=MANIFEST_FILE, check="schema") from None


def parse_manifest(data: bytes, *, source: str) -> Manifest:
    """Parse and schema-check manifest.json bytes; SchemaError names the field that is missing or wrong."""
    return parse_manifest_raw(data, source=source)[0]
