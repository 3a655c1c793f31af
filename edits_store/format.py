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

import errno
import hashlib
import json
import logging
import math
import os
import queue
import re
import stat
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator
from safetensors.torch import save as safetensors_save

from .errors import (
    DuplicatePairError,
    HashMismatchError,
    IncompatiblePackError,
    MissingBetaError,
    MissingFileError,
    NonFiniteError,
    PackError,
    PackNotFoundError,
    SchemaError,
    SenseIdRangeError,
    SignatureError,
    StoreIOError,
    TensorFormatError,
    TokenIdRangeError,
    TruncatedFileError,
    UnsafeFileError,
)

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
MAX_SAFETENSORS_HEADER_BYTES = 1 << 16  # three tensor entries and a small __metadata__ fit in far less
MAX_SIGNATURE_BYTES = 4096
MAX_JSON_DEPTH = 32

_HASH_CHUNK = 1 << 21  # 2 MiB: small enough to overlap reading and hashing, large enough to amortise queue costs
_ST_DTYPES = {"I64": torch.int64, "F32": torch.float32}
_EXPECTED_DTYPES = {"token_ids": "I64", "sense_ids": "I64", "deltas": "F32"}


# --------------------------------------------------------------------------- manifest


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


class _JSONRefusal(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _JSONRefusal(f"non-finite number {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JSONRefusal(f"number {text} overflows to {value}")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JSONRefusal(f"duplicate key {key!r}")
        out[key] = value
    return out


def _json_depth(obj: Any) -> int:
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return depth


def strict_json_loads(data: bytes | bytearray | memoryview) -> Any:
    """json.loads that refuses what would make two different files mean one value: NaN/Infinity, numbers that
    overflow to inf, duplicate keys; and nesting deeper than MAX_JSON_DEPTH. Raises ValueError with the reason."""
    try:
        text = bytes(data).decode("utf-8")
        obj = json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except RecursionError:
        raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc})") from None
    except _JSONRefusal as exc:
        raise ValueError(str(exc)) from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise ValueError(f"not valid JSON ({exc})") from None
    if _json_depth(obj) > MAX_JSON_DEPTH:
        raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH}")
    return obj


def manifest_to_bytes(manifest: Manifest) -> bytes:
    """Human-readable manifest.json bytes (indented, sorted keys)."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True, allow_nan=False)
    return (text + "\n").encode("utf-8")


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _schema_error_detail(exc: ValidationError) -> str:
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
        raise SchemaError(_schema_error_detail(exc), pack=source, file=MANIFEST_FILE, check="schema") from None


def parse_manifest(data: bytes, *, source: str) -> Manifest:
    """Parse and schema-check manifest.json bytes; SchemaError names the field that is missing or wrong."""
    return parse_manifest_raw(data, source=source)[0]


# --------------------------------------------------------------------------- contents


@dataclass
class PackContents:
    """A validated pack in memory: the manifest and the sparse (token, sense) → Δ edits, sorted by (token, sense)."""

    manifest: Manifest
    token_ids: torch.Tensor  # int64 [n]
    sense_ids: torch.Tensor  # int64 [n]
    deltas: torch.Tensor  # float32 [n, d]
    signature: bytes | None = None  # signature.json bytes, when the version is signed

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def ref(self) -> str:
        return self.manifest.ref


@dataclass
class Expectations:
    """What the serving side has loaded; a pack that does not fit is refused.

    ``allow_incompatible`` overrides only the Backpack/tokenizer fingerprint checks (an operator's explicit
    decision, logged); width, id ranges and β are never overridable because the pack could not be applied.
    """

    backpack_fingerprint: str | None = None
    tokenizer_fingerprint: str | None = None
    vocab_size: int | None = None
    num_senses: int | None = None
    d_model: int | None = None
    target_fingerprint: str | None = None
    allow_incompatible: bool = False
    trusted_keys: tuple[bytes, ...] | None = None  # raw ed25519 public keys; set: only packs signed by one load


def _as_ids(x: Any, field: str, pack: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TensorFormatError(f"{field} must be an integer tensor, got {t.dtype}", pack=pack, check="dtype")
    return t.to(torch.int64).contiguous()


def _as_deltas(x: Any, pack: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if not t.dtype.is_floating_point:
        raise TensorFormatError(f"deltas must be a floating-point tensor, got {t.dtype}", pack=pack, check="dtype")
    return t.to(torch.float32).contiguous()


def validate_tensors(
    token_ids: torch.Tensor,
    sense_ids: torch.Tensor,
    deltas: torch.Tensor,
    *,
    n: int,
    d_model: int,
    vocab_size: int,
    num_senses: int,
    pack: str,
    file: str | None = TENSOR_FILE,
) -> None:
    """Shape, dtype, finiteness, id-range and uniqueness checks shared by build and read."""
    for tname, t, dtype in (
        ("token_ids", token_ids, torch.int64),
        ("sense_ids", sense_ids, torch.int64),
        ("deltas", deltas, torch.float32),
    ):
        if t.dtype != dtype:
            raise TensorFormatError(
                f"tensor '{tname}' has dtype {t.dtype}, expected {dtype}", pack=pack, file=file, check="dtype"
            )
    expected_shapes = {"token_ids": (n,), "sense_ids": (n,), "deltas": (n, d_model)}
    for tname, t in (("token_ids", token_ids), ("sense_ids", sense_ids), ("deltas", deltas)):
        if tuple(t.shape) != expected_shapes[tname]:
            raise TensorFormatError(
                f"tensor '{tname}' has shape {list(t.shape)}, expected "
                f"{list(expected_shapes[tname])} (n_senses_edited={n}, d_model={d_model})",
                pack=pack,
                file=file,
                check="shape",
            )
    check_finite(deltas, token_ids, sense_ids, pack=pack, file=file)
    check_id_ranges(token_ids, sense_ids, vocab_size=vocab_size, num_senses=num_senses, pack=pack, file=file)
    check_unique_pairs(token_ids, sense_ids, num_senses=num_senses, pack=pack, file=file)


def check_finite(
    deltas: torch.Tensor, token_ids: torch.Tensor, sense_ids: torch.Tensor, *, pack: str, file: str | None
) -> None:
    """NaN/Inf refusal.

    Fast path: per-row sums as one matrix-vector product (one streaming pass, cheaper than ``isfinite``);
    NaN/Inf propagate through it, so a finite row sum proves the row finite. Rows whose sum is not finite
    (a NaN/Inf, or a sum that overflowed) are checked exactly.
    """
    if deltas.numel() == 0:
        return
    row_sums = torch.mv(deltas, torch.ones(deltas.shape[1], dtype=deltas.dtype))
    suspect = (~torch.isfinite(row_sums)).nonzero().flatten()
    if suspect.numel() == 0:
        return
    bad_rows = suspect[(~torch.isfinite(deltas[suspect])).any(dim=1)]
    if bad_rows.numel() == 0:
        return  # sums overflowed but every value is finite
    row = int(bad_rows[0])
    kind = "NaN" if bool(torch.isnan(deltas[row]).any()) else "Inf"
    raise NonFiniteError(
        f"deltas contain {kind} in {bad_rows.numel()} row(s); first at row {row} "
        f"(token {int(token_ids[row])}, sense {int(sense_ids[row])})",
        pack=pack,
        file=file,
        check="finite",
    )


def check_id_ranges(
    token_ids: torch.Tensor, sense_ids: torch.Tensor, *, vocab_size: int, num_senses: int, pack: str, file: str | None
) -> None:
    if token_ids.numel() == 0:
        return
    bad = ((token_ids < 0) | (token_ids >= vocab_size)).nonzero().flatten()
    if bad.numel():
        row = int(bad[0])
        raise TokenIdRangeError(
            f"token id {int(token_ids[row])} at row {row} is outside the vocabulary "
            f"[0, {vocab_size}) ({bad.numel()} bad row(s))",
            pack=pack,
            file=file,
            check="token_id_range",
        )
    bad = ((sense_ids < 0) | (sense_ids >= num_senses)).nonzero().flatten()
    if bad.numel():
        row = int(bad[0])
        raise SenseIdRangeError(
            f"sense id {int(sense_ids[row])} at row {row} (token {int(token_ids[row])}) is outside "
            f"[0, {num_senses}) ({bad.numel()} bad row(s))",
            pack=pack,
            file=file,
            check="sense_id_range",
        )


def check_unique_pairs(
    token_ids: torch.Tensor, sense_ids: torch.Tensor, *, num_senses: int, pack: str, file: str | None
) -> None:
    if token_ids.numel() < 2:
        return
    keys = token_ids * num_senses + sense_ids
    sorted_keys, _ = torch.sort(keys)
    dup = (sorted_keys[1:] == sorted_keys[:-1]).nonzero().flatten()
    if dup.numel():
        key = int(sorted_keys[int(dup[0])])
        token, sense = divmod(key, num_senses)
        raise DuplicatePairError(
            f"(token {token}, sense {sense}) appears more than once ({dup.numel()} duplicate row(s))",
            pack=pack,
            file=file,
            check="unique_pairs",
        )


def serialize_tensors(token_ids: torch.Tensor, sense_ids: torch.Tensor, deltas: torch.Tensor) -> bytes:
    """senses.safetensors bytes; deterministic for identical tensors."""
    return safetensors_save(
        {"token_ids": token_ids, "sense_ids": sense_ids, "deltas": deltas}, metadata={"format": "pt"}
    )


def _sorted_rows(
    token_ids: torch.Tensor, sense_ids: torch.Tensor, deltas: torch.Tensor, num_senses: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical row order (by token, then sense) so the same edits in any order give the same version."""
    if token_ids.numel() < 2:
        return token_ids, sense_ids, deltas
    order = torch.argsort(token_ids * num_senses + sense_ids, stable=True)
    return token_ids[order].contiguous(), sense_ids[order].contiguous(), deltas[order].contiguous()


def _assemble(
    fields: dict[str, Any], token_ids: torch.Tensor, sense_ids: torch.Tensor, deltas: torch.Tensor
) -> PackContents:
    """Seal manifest fields + tensors: hash the tensor file, compute the content version, validate the result."""
    blob = serialize_tensors(token_ids, sense_ids, deltas)
    fields = dict(fields, files={TENSOR_FILE: hashlib.sha256(blob).hexdigest()}, version="0" * VERSION_LENGTH)
    try:
        draft = Manifest.model_validate(fields)
    except ValidationError as exc:
        raise SchemaError(
            _schema_error_detail(exc), pack=fields.get("name"), file=MANIFEST_FILE, check="schema"
        ) from None
    manifest = draft.model_copy(update={"version": compute_version(draft)})
    return PackContents(manifest=manifest, token_ids=token_ids, sense_ids=sense_ids, deltas=deltas)


def build_pack(
    name: str,
    token_ids: Any,
    sense_ids: Any,
    deltas: Any,
    *,
    backpack_name: str,
    backpack_fingerprint: str,
    tokenizer_fingerprint: str,
    vocab_size: int,
    num_senses: int,
    epsilon: float,
    calibration: Iterable[CalibrationEntry | Mapping[str, Any]] = (),
    training: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> PackContents:
    """Validate edits and wrap them as a pack; the version is the content hash (``created_at`` excluded).

    Rows are sorted by (token, sense). Integer ids are converted to int64 and deltas to float32.
    Raises the same PackError subclasses as reading, so a bad pack cannot even be built.
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SchemaError(f"pack name {name!r} must match {NAME_RE.pattern}", pack=str(name), check="name")
    tok = _as_ids(token_ids, "token_ids", name)
    sen = _as_ids(sense_ids, "sense_ids", name)
    dlt = _as_deltas(deltas, name)
    if dlt.dim() != 2:
        raise TensorFormatError(f"deltas must be 2-D [n, d], got shape {list(dlt.shape)}", pack=name, check="shape")
    n, d_model = dlt.shape
    validate_tensors(
        tok, sen, dlt, n=n, d_model=d_model, vocab_size=vocab_size, num_senses=num_senses, pack=name, file=None
    )
    tok, sen, dlt = _sorted_rows(tok, sen, dlt, num_senses)
    entries = [e if isinstance(e, CalibrationEntry) else CalibrationEntry.model_validate(dict(e)) for e in calibration]
    fields = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created_at": utc_now_iso(),
        "backpack": {"name": backpack_name, "fingerprint": backpack_fingerprint},
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "vocab_size": vocab_size,
        "num_senses": num_senses,
        "d_model": int(d_model),
        "n_senses_edited": int(n),
        "epsilon": float(epsilon),
        "calibration": [e.model_dump() for e in entries],
        "training": dict(training or {}),
        "evaluation": dict(evaluation or {}),
    }
    _check_json_safe(fields, name)
    return _assemble(fields, tok, sen, dlt)


def _check_json_safe(fields: Mapping[str, Any], pack: str) -> None:
    try:
        canonical_json(fields)
    except (TypeError, ValueError) as exc:
        raise SchemaError(
            f"manifest fields are not JSON-serialisable with finite numbers: {exc}",
            pack=pack,
            file=MANIFEST_FILE,
            check="json",
        ) from None


def with_calibration(pack: PackContents, entries: Iterable[CalibrationEntry]) -> PackContents:
    """A new pack (new version) with these entries added; an entry for an already-calibrated target replaces it."""
    new = list(entries)
    replaced = {e.target_fingerprint for e in new}
    kept = [e for e in pack.manifest.calibration if e.target_fingerprint not in replaced]
    fields = pack.manifest.model_dump(exclude={"version", "files"})
    fields["calibration"] = [e.model_dump() for e in kept + new]
    fields["created_at"] = utc_now_iso()
    return _assemble(fields, pack.token_ids, pack.sense_ids, pack.deltas)


def pack_files(pack: PackContents) -> dict[str, bytes]:
    """The files of a pack version as bytes, manifest last; refuses tensors changed since the pack was sealed."""
    blob = serialize_tensors(pack.token_ids.contiguous(), pack.sense_ids.contiguous(), pack.deltas.contiguous())
    digest = hashlib.sha256(blob).hexdigest()
    if pack.manifest.files.get(TENSOR_FILE) != digest:
        raise HashMismatchError(
            "tensors were modified after the pack was built; rebuild it",
            pack=pack.ref,
            file=TENSOR_FILE,
            check="sha256",
        )
    manifest_bytes = manifest_to_bytes(pack.manifest)
    written = compute_version(strict_json_loads(manifest_bytes))  # what a reader will hash
    if written != pack.manifest.version:
        raise SchemaError(
            f"manifest version {pack.manifest.version} is not the content hash {written} of the "
            "manifest that would be written; build packs with build_pack",
            pack=pack.ref,
            file=MANIFEST_FILE,
            check="version",
        )
    files = {TENSOR_FILE: blob}
    if pack.signature is not None:
        files[SIGNATURE_FILE] = pack.signature
    files[MANIFEST_FILE] = manifest_bytes  # last: the commit marker
    return files


def _fsync_write(path: str, data: bytes) -> None:
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


def write_pack(pack: PackContents, folder: str | os.PathLike[str]) -> None:
    """Write the pack's two files into ``folder`` (created if needed), tensors first, manifest last, fsynced.

    Not atomic on its own (the store is); a reader of a half-written folder fails validation rather than
    seeing a partial pack, because the manifest that lists the hashes is written last.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    files = pack_files(pack)
    for fname, data in files.items():  # dict order: tensor file first, manifest last
        _fsync_write(os.path.join(folder, fname), data)
    fsync_dir(folder)
    log.info("event=pack_written pack=%s folder=%s bytes=%d", pack.ref, folder, sum(map(len, files.values())))


# --------------------------------------------------------------------------- reading


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


def tensor_file_cap(manifest: Manifest) -> int:
    """The largest senses.safetensors a manifest can justify: header cap + 8 + n × (8 + 8 + 4 d) bytes."""
    n, d = manifest.n_senses_edited, manifest.d_model
    return 8 + MAX_SAFETENSORS_HEADER_BYTES + n * (16 + 4 * d)


def _declared_safetensors_size(data: bytes | bytearray) -> int | None:
    """Total size a safetensors file declares in its header, or None if the header itself is unreadable."""
    if len(data) < 8:
        return None
    header_len: int = struct.unpack("<Q", bytes(data[:8]))[0]
    if header_len > len(data) - 8:
        return 8 + header_len  # at least this much was declared
    if header_len > MAX_SAFETENSORS_HEADER_BYTES:
        return None
    try:
        header = strict_json_loads(data[8 : 8 + header_len])
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if type(end) is not int:
            return None
        return 8 + header_len + int(end)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _hash_failure(fname: str, data: bytes | bytearray, expected: str, actual: str, source: str) -> PackError:
    if fname == TENSOR_FILE:
        declared = _declared_safetensors_size(data)
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


def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool, not float: 1.0 as an offset is malformed, not "1"


def parse_safetensors(data: bytearray | bytes, *, source: str) -> dict[str, torch.Tensor]:
    """Strict zero-copy parse of a safetensors buffer: well-formed header, contiguous offsets, known dtypes."""

    def fail(detail: str, check: str = "safetensors_header") -> TensorFormatError:
        return TensorFormatError(detail, pack=source, file=TENSOR_FILE, check=check)

    if len(data) < 8:
        raise fail(f"file has {len(data)} bytes, too short for a safetensors header")
    header_len: int = struct.unpack("<Q", bytes(data[:8]))[0]
    if header_len > MAX_SAFETENSORS_HEADER_BYTES:
        raise fail(f"header length {header_len} exceeds the {MAX_SAFETENSORS_HEADER_BYTES}-byte cap")
    if header_len > len(data) - 8:
        raise fail(f"header length {header_len} exceeds file size {len(data)}")
    try:
        header = strict_json_loads(data[8 : 8 + header_len])
    except ValueError as exc:
        raise fail(f"header is refused as JSON: {exc}") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise fail("__metadata__ must map strings to strings")
    names = sorted(header)
    if names != sorted(TENSOR_NAMES):
        raise fail(f"tensors are {names}, expected exactly {sorted(TENSOR_NAMES)}", check="tensor_names")
    start = 8 + header_len
    body_len = len(data) - start
    spans = []
    tensors: dict[str, torch.Tensor] = {}
    for tname in TENSOR_NAMES:
        info = header[tname]
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"tensor '{tname}' header entry must have exactly dtype, shape, data_offsets: {info!r:.200}")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not (
            isinstance(shape, list)
            and len(shape) <= 2
            and all(_is_int(s) and s >= 0 for s in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
        ):
            raise fail(f"tensor '{tname}' has a malformed shape or data_offsets: {info!r:.200}")
        if dtype_name != _EXPECTED_DTYPES[tname]:
            raise fail(
                f"tensor '{tname}' has dtype {dtype_name!r:.40}, expected {_EXPECTED_DTYPES[tname]}", check="dtype"
            )
        begin, end = offsets
        dtype = _ST_DTYPES[dtype_name]
        count = math.prod(shape)
        if not (0 <= begin <= end <= body_len) or end - begin != count * dtype.itemsize:
            raise fail(
                f"tensor '{tname}' offsets [{begin}, {end}) do not fit shape {shape} {dtype_name} "
                f"in a {body_len}-byte body"
            )
        spans.append((begin, end))
        if count == 0:
            tensors[tname] = torch.empty(shape, dtype=dtype)
        else:
            tensors[tname] = torch.frombuffer(data, dtype=dtype, offset=start + begin, count=count).view(shape)
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise fail("tensor data regions overlap or leave gaps")
        covered = end
    if covered != body_len:
        raise fail(f"{body_len - covered} unexpected trailing bytes after the tensor data")
    return tensors


def check_expectations(manifest: Manifest, expect: Expectations | None, *, source: str) -> None:
    """Refuse a pack that does not fit what is served (fingerprints overridable; width and β are not)."""
    if expect is None:
        return
    fp_checks = (
        ("backpack_fingerprint", manifest.backpack["fingerprint"], expect.backpack_fingerprint, "Backpack"),
        ("tokenizer_fingerprint", manifest.tokenizer_fingerprint, expect.tokenizer_fingerprint, "tokenizer"),
    )
    for check, have, want, what in fp_checks:
        if want is None or have == want:
            continue
        detail = f"pack was trained with {what} {have} but the served {what} is {want}"
        if not expect.allow_incompatible:
            raise IncompatiblePackError(
                detail + " (override with allow_incompatible)", pack=source, file=MANIFEST_FILE, check=check
            )
        log.warning("event=incompatible_pack_override pack=%s check=%s have=%s want=%s", source, check, have, want)
    if expect.d_model is not None and expect.d_model != manifest.d_model:
        raise IncompatiblePackError(
            f"pack deltas have width d_model={manifest.d_model} but the served Backpack has {expect.d_model}",
            pack=source,
            file=MANIFEST_FILE,
            check="d_model",
        )
    if expect.target_fingerprint is not None:
        manifest.beta_for(expect.target_fingerprint)


def _effective_limits(manifest: Manifest, expect: Expectations | None) -> tuple[int, int]:
    vocab, senses = manifest.vocab_size, manifest.num_senses
    if expect is not None and expect.vocab_size is not None:
        vocab = min(vocab, expect.vocab_size)
    if expect is not None and expect.num_senses is not None:
        senses = min(senses, expect.num_senses)
    return vocab, senses


def load_from_source(
    src: PackFiles,
    *,
    expect: Expectations | None = None,
    expect_name: str | None = None,
    expect_version: str | None = None,
    manifest_bytes: bytes | None = None,
) -> PackContents:
    """Read and fully validate a pack from ``src``. ``expect_name``/``expect_version`` pin where it was found.

    ``manifest_bytes``: validate these instead of reading manifest.json (a publisher checking its files before
    the manifest commits them). Every failure is a ``PackError``; no thread or buffer outlives the call.
    """
    label = src.label
    src.check_confined()
    if manifest_bytes is None:
        try:
            manifest_bytes = src.read(MANIFEST_FILE, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            if not src.folder_exists():
                raise PackNotFoundError(f"no pack folder at {src.location}", pack=label, check="exists") from None
            raise MissingFileError(
                "manifest.json is missing", pack=label, file=MANIFEST_FILE, check="file_present"
            ) from None
    manifest, raw = parse_manifest_raw(manifest_bytes, source=label)
    digest = content_digest(raw)
    computed = digest[:VERSION_LENGTH]
    if computed != manifest.version:
        raise HashMismatchError(
            f"manifest says version {manifest.version} but its content hashes to {computed}",
            pack=label,
            file=MANIFEST_FILE,
            check="version",
        )
    if expect_name is not None and manifest.name != expect_name:
        raise SchemaError(
            f"manifest names pack {manifest.name!r} but it is stored under {expect_name!r}",
            pack=label,
            file=MANIFEST_FILE,
            check="location",
        )
    if expect_version is not None and manifest.version != expect_version:
        raise SchemaError(
            f"manifest is version {manifest.version} but it is stored as {expect_version}",
            pack=label,
            file=MANIFEST_FILE,
            check="location",
        )
    label = f"{manifest.ref} ({src.location})" if label == src.location else label

    # Hash first: nothing in the tensor file is parsed before its bytes are known to be the published ones.
    expected_sha = manifest.files[TENSOR_FILE]
    try:
        data, actual = src.read_hashing(TENSOR_FILE, tensor_file_cap(manifest))
    except FileNotFoundError:
        raise MissingFileError(
            f"{TENSOR_FILE} is listed in the manifest but absent", pack=label, file=TENSOR_FILE, check="file_present"
        ) from None
    if actual != expected_sha:
        raise _hash_failure(TENSOR_FILE, data, expected_sha, actual, label)
    tensors = parse_safetensors(data, source=label)
    vocab, senses = _effective_limits(manifest, expect)
    validate_tensors(
        tensors["token_ids"],
        tensors["sense_ids"],
        tensors["deltas"],
        n=manifest.n_senses_edited,
        d_model=manifest.d_model,
        vocab_size=vocab,
        num_senses=senses,
        pack=label,
    )
    signature = None
    if expect is not None and expect.trusted_keys is not None:
        from .signing import verify_signature  # cryptography is needed only where signatures are required

        try:
            signature = src.read(SIGNATURE_FILE, MAX_SIGNATURE_BYTES)
        except FileNotFoundError:
            raise SignatureError(
                "the version is unsigned and only signed packs are accepted",
                pack=label,
                file=SIGNATURE_FILE,
                check="signature_present",
            ) from None
        verify_signature(signature, name=manifest.name, digest=digest, trusted=expect.trusted_keys, pack=label)
    check_expectations(manifest, expect, source=label)
    return PackContents(
        manifest=manifest,
        token_ids=tensors["token_ids"],
        sense_ids=tensors["sense_ids"],
        deltas=tensors["deltas"],
        signature=signature,
    )


def read_pack(
    folder_or_fs_path: str | os.PathLike[str], *, expect: Expectations | None = None, fs: Any = None
) -> PackContents:
    """Read and fully validate the pack in a folder (local, or a path on the fsspec filesystem ``fs``)."""
    src = PackFiles(os.fspath(folder_or_fs_path), fs=fs)
    return load_from_source(src, expect=expect)


def describe(pack: PackContents) -> dict[str, Any]:
    """Manifest plus a few derived numbers, for ``show``."""
    out = pack.manifest.model_dump(mode="json")
    out["delta_norm_max"] = float(pack.deltas.norm(dim=1).max()) if pack.deltas.numel() else 0.0
    return out


def replace_fields(pack: PackContents, **fields: Any) -> PackContents:
    """A resealed copy of ``pack`` with manifest fields replaced (e.g. ``evaluation``): new content, new version."""
    base = pack.manifest.model_dump(exclude={"version", "files"})
    base.update(fields)
    base["created_at"] = utc_now_iso()
    return _assemble(base, pack.token_ids, pack.sense_ids, pack.deltas)


__all__ = [
    "MANIFEST_FILE",
    "NAME_RE",
    "SCHEMA_VERSION",
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
    "describe",
    "load_from_source",
    "pack_files",
    "parse_manifest",
    "read_pack",
    "replace_fields",
    "validate_tensors",
    "with_calibration",
    "write_pack",
]
