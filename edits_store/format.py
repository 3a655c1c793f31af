"""Edit-pack format (DESIGN §3): ``senses.safetensors`` + ``manifest.json``.

A pack version is named by its content: ``version`` is the first 16 hex chars
of the sha256 of the canonical manifest JSON *without* ``version`` and
``created_at``. The manifest records the sha256 of ``senses.safetensors``, so the
version transitively covers the tensors, the Backpack/tokenizer fingerprints,
the calibration entries and the training/evaluation records: identical content
gives an identical version, any change gives a new one.

Reading validates everything, in this order (first failure wins):
manifest JSON → schema version → manifest fields → version = content hash →
each file present, sha256 (truncation diagnosed separately) → tensor names,
dtypes, shapes → NaN/Inf → token/sense id ranges → unique pairs → the
expectations of the caller (Backpack/tokenizer fingerprints, width, β for the
served target model).

Reading is tuned for the serving hot path: the tensor file is read once into
one buffer while a second thread hashes it chunk by chunk (hashlib releases
the GIL), and the tensors are zero-copy views of that buffer. Structural
checks run while the hash finishes; a hash mismatch always takes precedence
over any structural error (a flipped byte must be reported as corruption, not
as, say, a NaN).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import re
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
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
    TensorFormatError,
    TokenIdRangeError,
    TruncatedFileError,
)

log = logging.getLogger("edits_store.format")

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSOR_FILE = "senses.safetensors"
TENSOR_NAMES = ("token_ids", "sense_ids", "deltas")
VERSION_LENGTH = 16

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}$")

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
    def _strings(cls, v: str, info) -> str:
        return _non_empty(v, info.field_name)

    @field_validator("beta", "ball_ratio", "epsilon")
    @classmethod
    def _floats(cls, v: float, info) -> float:
        return _finite(v, info.field_name)

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
        if parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:
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
    def _positive(cls, v: int, info) -> int:
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
        if TENSOR_FILE not in v:
            raise ValueError(f"files must list {TENSOR_FILE}")
        for fname, digest in v.items():
            if fname == MANIFEST_FILE or "/" in fname or fname.startswith("."):
                raise ValueError(f"files lists an invalid file name {fname!r}")
            if not SHA256_HEX_RE.match(digest):
                raise ValueError(f"files[{fname!r}] must be a 64-char lowercase sha256 hex digest")
        return v

    @model_validator(mode="after")
    def _unique_targets(self) -> "Manifest":
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
            pack=f"{self.name}@{self.version}", file=MANIFEST_FILE, check="beta_for_target")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace, NaN refused): the input of the content hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def compute_version(manifest: Manifest | Mapping[str, Any]) -> str:
    """Content version: sha256 of the canonical manifest minus ``version`` and ``created_at``, first 16 hex chars."""
    body = manifest.model_dump(mode="json") if isinstance(manifest, Manifest) else dict(manifest)
    body.pop("version", None)
    body.pop("created_at", None)
    return hashlib.sha256(canonical_json(body)).hexdigest()[:VERSION_LENGTH]


def manifest_to_bytes(manifest: Manifest) -> bytes:
    """Human-readable manifest.json bytes (indented, sorted keys)."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True, allow_nan=False)
    return (text + "\n").encode("utf-8")


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


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


def parse_manifest(data: bytes, *, source: str) -> Manifest:
    """Parse and schema-check manifest.json bytes; SchemaError names the field that is missing or wrong."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"manifest is not valid JSON ({exc}); the file may be truncated",
                          pack=source, file=MANIFEST_FILE, check="json") from None
    if not isinstance(raw, dict):
        raise SchemaError("manifest must be a JSON object", pack=source, file=MANIFEST_FILE, check="json")
    if "schema_version" not in raw:
        raise SchemaError("missing field 'schema_version'", pack=source, file=MANIFEST_FILE, check="schema_version")
    if raw["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema_version {raw['schema_version']!r}; this reader understands "
                          f"{SCHEMA_VERSION} (a newer sensepack may have written it)",
                          pack=source, file=MANIFEST_FILE, check="schema_version")
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise SchemaError(_schema_error_detail(exc), pack=source, file=MANIFEST_FILE, check="schema") from None


# --------------------------------------------------------------------------- contents


@dataclass
class PackContents:
    """A validated pack in memory: the manifest and the sparse (token, sense) → Δ edits, sorted by (token, sense)."""

    manifest: Manifest
    token_ids: torch.Tensor  # int64 [n]
    sense_ids: torch.Tensor  # int64 [n]
    deltas: torch.Tensor  # float32 [n, d]

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


def validate_tensors(token_ids: torch.Tensor, sense_ids: torch.Tensor, deltas: torch.Tensor, *, n: int, d_model: int,
                     vocab_size: int, num_senses: int, pack: str, file: str | None = TENSOR_FILE) -> None:
    """Shape, dtype, finiteness, id-range and uniqueness checks shared by build and read."""
    for tname, t, dtype in (("token_ids", token_ids, torch.int64), ("sense_ids", sense_ids, torch.int64),
                            ("deltas", deltas, torch.float32)):
        if t.dtype != dtype:
            raise TensorFormatError(f"tensor '{tname}' has dtype {t.dtype}, expected {dtype}", pack=pack, file=file,
                                    check="dtype")
    expected_shapes = {"token_ids": (n,), "sense_ids": (n,), "deltas": (n, d_model)}
    for tname, t in (("token_ids", token_ids), ("sense_ids", sense_ids), ("deltas", deltas)):
        if tuple(t.shape) != expected_shapes[tname]:
            raise TensorFormatError(f"tensor '{tname}' has shape {list(t.shape)}, expected "
                                    f"{list(expected_shapes[tname])} (n_senses_edited={n}, d_model={d_model})",
                                    pack=pack, file=file, check="shape")
    check_finite(deltas, token_ids, sense_ids, pack=pack, file=file)
    check_id_ranges(token_ids, sense_ids, vocab_size=vocab_size, num_senses=num_senses, pack=pack, file=file)
    check_unique_pairs(token_ids, sense_ids, num_senses=num_senses, pack=pack, file=file)


def check_finite(deltas: torch.Tensor, token_ids: torch.Tensor, sense_ids: torch.Tensor, *, pack: str,
                 file: str | None) -> None:
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
    raise NonFiniteError(f"deltas contain {kind} in {bad_rows.numel()} row(s); first at row {row} "
                         f"(token {int(token_ids[row])}, sense {int(sense_ids[row])})",
                         pack=pack, file=file, check="finite")


def check_id_ranges(token_ids: torch.Tensor, sense_ids: torch.Tensor, *, vocab_size: int, num_senses: int, pack: str,
                    file: str | None) -> None:
    if token_ids.numel() == 0:
        return
    bad = ((token_ids < 0) | (token_ids >= vocab_size)).nonzero().flatten()
    if bad.numel():
        row = int(bad[0])
        raise TokenIdRangeError(f"token id {int(token_ids[row])} at row {row} is outside the vocabulary "
                                f"[0, {vocab_size}) ({bad.numel()} bad row(s))", pack=pack, file=file,
                                check="token_id_range")
    bad = ((sense_ids < 0) | (sense_ids >= num_senses)).nonzero().flatten()
    if bad.numel():
        row = int(bad[0])
        raise SenseIdRangeError(f"sense id {int(sense_ids[row])} at row {row} (token {int(token_ids[row])}) is outside "
                                f"[0, {num_senses}) ({bad.numel()} bad row(s))", pack=pack, file=file,
                                check="sense_id_range")


def check_unique_pairs(token_ids: torch.Tensor, sense_ids: torch.Tensor, *, num_senses: int, pack: str,
                       file: str | None) -> None:
    if token_ids.numel() < 2:
        return
    keys = token_ids * num_senses + sense_ids
    sorted_keys, _ = torch.sort(keys)
    dup = (sorted_keys[1:] == sorted_keys[:-1]).nonzero().flatten()
    if dup.numel():
        key = int(sorted_keys[int(dup[0])])
        token, sense = divmod(key, num_senses)
        raise DuplicatePairError(f"(token {token}, sense {sense}) appears more than once "
                                 f"({dup.numel()} duplicate row(s))", pack=pack, file=file, check="unique_pairs")


def serialize_tensors(token_ids: torch.Tensor, sense_ids: torch.Tensor, deltas: torch.Tensor) -> bytes:
    """senses.safetensors bytes; deterministic for identical tensors."""
    return safetensors_save({"token_ids": token_ids, "sense_ids": sense_ids, "deltas": deltas},
                            metadata={"format": "pt"})


def _sorted_rows(token_ids: torch.Tensor, sense_ids: torch.Tensor, deltas: torch.Tensor,
                 num_senses: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical row order (by token, then sense) so the same edits in any order give the same version."""
    if token_ids.numel() < 2:
        return token_ids, sense_ids, deltas
    order = torch.argsort(token_ids * num_senses + sense_ids, stable=True)
    return token_ids[order].contiguous(), sense_ids[order].contiguous(), deltas[order].contiguous()


def _assemble(fields: dict[str, Any], token_ids: torch.Tensor, sense_ids: torch.Tensor,
              deltas: torch.Tensor) -> PackContents:
    """Seal manifest fields + tensors: hash the tensor file, compute the content version, validate the result."""
    blob = serialize_tensors(token_ids, sense_ids, deltas)
    fields = dict(fields, files={TENSOR_FILE: hashlib.sha256(blob).hexdigest()}, version="0" * VERSION_LENGTH)
    try:
        draft = Manifest.model_validate(fields)
    except ValidationError as exc:
        raise SchemaError(_schema_error_detail(exc), pack=fields.get("name"), file=MANIFEST_FILE,
                          check="schema") from None
    manifest = draft.model_copy(update={"version": compute_version(draft)})
    return PackContents(manifest=manifest, token_ids=token_ids, sense_ids=sense_ids, deltas=deltas)


def build_pack(name: str, token_ids: Any, sense_ids: Any, deltas: Any, *, backpack_name: str,
               backpack_fingerprint: str, tokenizer_fingerprint: str, vocab_size: int, num_senses: int,
               epsilon: float, calibration: Iterable[CalibrationEntry | Mapping[str, Any]] = (),
               training: Mapping[str, Any] | None = None,
               evaluation: Mapping[str, Any] | None = None) -> PackContents:
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
    validate_tensors(tok, sen, dlt, n=n, d_model=d_model, vocab_size=vocab_size, num_senses=num_senses, pack=name,
                     file=None)
    tok, sen, dlt = _sorted_rows(tok, sen, dlt, num_senses)
    entries = [e if isinstance(e, CalibrationEntry) else CalibrationEntry.model_validate(dict(e)) for e in calibration]
    fields = {
        "schema_version": SCHEMA_VERSION, "name": name, "created_at": utc_now_iso(),
        "backpack": {"name": backpack_name, "fingerprint": backpack_fingerprint},
        "tokenizer_fingerprint": tokenizer_fingerprint, "vocab_size": vocab_size, "num_senses": num_senses,
        "d_model": int(d_model), "n_senses_edited": int(n), "epsilon": float(epsilon),
        "calibration": [e.model_dump() for e in entries],
        "training": dict(training or {}), "evaluation": dict(evaluation or {}),
    }
    _check_json_safe(fields, name)
    return _assemble(fields, tok, sen, dlt)


def _check_json_safe(fields: Mapping[str, Any], pack: str) -> None:
    try:
        canonical_json(fields)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"manifest fields are not JSON-serialisable with finite numbers: {exc}", pack=pack,
                          file=MANIFEST_FILE, check="json") from None


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
        raise HashMismatchError("tensors were modified after the pack was built; rebuild it",
                                pack=pack.ref, file=TENSOR_FILE, check="sha256")
    return {TENSOR_FILE: blob, MANIFEST_FILE: manifest_to_bytes(pack.manifest)}


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


def write_pack(pack: PackContents, folder: str | os.PathLike) -> None:
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
    """A sha256 being computed in a background thread over a buffer that is still being filled."""

    def __init__(self, buf: bytearray):
        self._view = memoryview(buf)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._hasher = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name="pack-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (span := self._queue.get()) is not None:
            self._hasher.update(self._view[span[0]:span[1]])

    def feed(self, start: int, end: int) -> None:
        self._queue.put((start, end))

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._hasher.hexdigest()


def _read_local_hashing(path: str) -> tuple[bytearray, _PendingHash]:
    """Read a whole file into one buffer while another thread hashes the chunks already read."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        view = memoryview(buf)
        pending = _PendingHash(buf)
        pos = 0
        try:
            while pos < size:
                got = f.readinto(view[pos:min(size, pos + _HASH_CHUNK)])
                if not got:
                    break
                pending.feed(pos, pos + got)
                pos += got
        except BaseException:
            pending.hexdigest()  # stop the hashing thread before propagating
            raise
    if pos < size:  # the file shrank while being read: return what was read; its hash will not match
        return bytearray(view[:pos]), pending
    return buf, pending


class _DoneHash:
    def __init__(self, data: bytes | bytearray):
        self._digest = hashlib.sha256(data).hexdigest()

    def hexdigest(self) -> str:
        return self._digest


class PackSource:
    """Where a pack's files come from: a local folder, or a folder on an fsspec filesystem."""

    def __init__(self, location: str, *, fs: Any = None, label: str | None = None):
        self.location = location.rstrip("/") if fs is not None else os.fspath(location)
        self.fs = fs
        self.label = label or self.location

    def _path(self, fname: str) -> str:
        return f"{self.location}/{fname}" if self.fs is not None else os.path.join(self.location, fname)

    def folder_exists(self) -> bool:
        if self.fs is None:
            return os.path.isdir(self.location)
        return bool(self.fs.exists(self.location))

    def read(self, fname: str) -> bytes:
        """Whole file; FileNotFoundError if absent."""
        if self.fs is None:
            with open(self._path(fname), "rb") as f:
                return f.read()
        return self.fs.cat_file(self._path(fname))

    def read_hashing(self, fname: str) -> tuple[bytearray | bytes, Any]:
        """Whole file plus an object whose ``hexdigest()`` gives its sha256 (possibly still being computed)."""
        if self.fs is None:
            return _read_local_hashing(self._path(fname))
        data = bytearray(self.fs.cat_file(self._path(fname)))
        return data, _DoneHash(data)


def _declared_safetensors_size(data: bytes | bytearray) -> int | None:
    """Total size a safetensors file declares in its header, or None if the header itself is unreadable."""
    if len(data) < 8:
        return None
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > len(data) - 8:
        return 8 + header_len  # at least this much was declared
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return 8 + header_len + int(end)
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _hash_failure(fname: str, data: bytes | bytearray, expected: str, actual: str, source: str) -> PackError:
    if fname == TENSOR_FILE:
        declared = _declared_safetensors_size(data)
        if declared is not None and len(data) < declared:
            return TruncatedFileError(f"file has {len(data)} bytes but its header declares {declared}: truncated",
                                      pack=source, file=fname, check="size")
    return HashMismatchError(f"sha256 is {actual}, manifest says {expected} (file has {len(data)} bytes)",
                             pack=source, file=fname, check="sha256")


def parse_safetensors(data: bytearray | bytes, *, source: str) -> dict[str, torch.Tensor]:
    """Strict zero-copy parse of a safetensors buffer: well-formed header, contiguous offsets, known dtypes."""
    def fail(detail: str, check: str = "safetensors_header") -> TensorFormatError:
        return TensorFormatError(detail, pack=source, file=TENSOR_FILE, check=check)

    if len(data) < 8:
        raise fail(f"file has {len(data)} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > len(data) - 8:
        raise fail(f"header length {header_len} exceeds file size {len(data)}")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    header.pop("__metadata__", None)
    names = sorted(header)
    if names != sorted(TENSOR_NAMES):
        raise fail(f"tensors are {names}, expected exactly {sorted(TENSOR_NAMES)}", check="tensor_names")
    start = 8 + header_len
    body_len = len(data) - start
    spans = []
    tensors: dict[str, torch.Tensor] = {}
    for tname in TENSOR_NAMES:
        info = header[tname]
        try:
            dtype_name, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise fail(f"tensor '{tname}' has a malformed header entry {info!r}") from None
        if dtype_name != _EXPECTED_DTYPES[tname]:
            raise fail(f"tensor '{tname}' has dtype {dtype_name}, expected {_EXPECTED_DTYPES[tname]}", check="dtype")
        dtype = _ST_DTYPES[dtype_name]
        count = math.prod(shape)
        if any(s < 0 for s in shape) or not (0 <= begin <= end <= body_len) or end - begin != count * dtype.itemsize:
            raise fail(f"tensor '{tname}' offsets [{begin}, {end}) do not fit shape {shape} {dtype_name} "
                       f"in a {body_len}-byte body")
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
    fp_checks = (("backpack_fingerprint", manifest.backpack["fingerprint"], expect.backpack_fingerprint, "Backpack"),
                 ("tokenizer_fingerprint", manifest.tokenizer_fingerprint, expect.tokenizer_fingerprint, "tokenizer"))
    for check, have, want, what in fp_checks:
        if want is None or have == want:
            continue
        detail = f"pack was trained with {what} {have} but the served {what} is {want}"
        if not expect.allow_incompatible:
            raise IncompatiblePackError(detail + " (override with allow_incompatible)", pack=source,
                                        file=MANIFEST_FILE, check=check)
        log.warning("event=incompatible_pack_override pack=%s check=%s have=%s want=%s", source, check, have, want)
    if expect.d_model is not None and expect.d_model != manifest.d_model:
        raise IncompatiblePackError(f"pack deltas have width d_model={manifest.d_model} but the served Backpack has "
                                    f"{expect.d_model}", pack=source, file=MANIFEST_FILE, check="d_model")
    if expect.target_fingerprint is not None:
        manifest.beta_for(expect.target_fingerprint)


def _effective_limits(manifest: Manifest, expect: Expectations | None) -> tuple[int, int]:
    vocab, senses = manifest.vocab_size, manifest.num_senses
    if expect is not None and expect.vocab_size is not None:
        vocab = min(vocab, expect.vocab_size)
    if expect is not None and expect.num_senses is not None:
        senses = min(senses, expect.num_senses)
    return vocab, senses


def load_from_source(src: PackSource, *, expect: Expectations | None = None,
                     expect_name: str | None = None, expect_version: str | None = None) -> PackContents:
    """Read and fully validate a pack from ``src``. ``expect_name``/``expect_version`` pin where it was found."""
    label = src.label
    try:
        manifest_bytes = src.read(MANIFEST_FILE)
    except FileNotFoundError:
        if not src.folder_exists():
            raise PackNotFoundError(f"no pack folder at {src.location}", pack=label, check="exists") from None
        raise MissingFileError("manifest.json is missing", pack=label, file=MANIFEST_FILE,
                               check="file_present") from None
    manifest = parse_manifest(manifest_bytes, source=label)
    computed = compute_version(manifest)
    if computed != manifest.version:
        raise HashMismatchError(f"manifest says version {manifest.version} but its content hashes to {computed}",
                                pack=label, file=MANIFEST_FILE, check="version")
    if expect_name is not None and manifest.name != expect_name:
        raise SchemaError(f"manifest names pack {manifest.name!r} but it is stored under {expect_name!r}",
                          pack=label, file=MANIFEST_FILE, check="location")
    if expect_version is not None and manifest.version != expect_version:
        raise SchemaError(f"manifest is version {manifest.version} but it is stored as {expect_version}",
                          pack=label, file=MANIFEST_FILE, check="location")
    label = f"{manifest.ref} ({src.location})" if label == src.location else label

    tensors: dict[str, torch.Tensor] | None = None
    for fname, expected_sha in manifest.files.items():
        try:
            data, pending = src.read_hashing(fname)
        except FileNotFoundError:
            raise MissingFileError(f"{fname} is listed in the manifest but absent", pack=label, file=fname,
                                   check="file_present") from None
        structural: PackError | None = None
        if fname == TENSOR_FILE:
            try:  # runs while the hash thread finishes; reported only if the hash matches
                tensors = parse_safetensors(data, source=label)
                vocab, senses = _effective_limits(manifest, expect)
                validate_tensors(tensors["token_ids"], tensors["sense_ids"], tensors["deltas"],
                                 n=manifest.n_senses_edited, d_model=manifest.d_model, vocab_size=vocab,
                                 num_senses=senses, pack=label)
            except PackError as exc:
                structural = exc
        actual = pending.hexdigest()
        if actual != expected_sha:
            raise _hash_failure(fname, data, expected_sha, actual, label)
        if structural is not None:
            raise structural
    assert tensors is not None  # the schema requires TENSOR_FILE in files
    check_expectations(manifest, expect, source=label)
    return PackContents(manifest=manifest, token_ids=tensors["token_ids"], sense_ids=tensors["sense_ids"],
                        deltas=tensors["deltas"])


def read_pack(folder_or_fs_path: str | os.PathLike, *, expect: Expectations | None = None,
              fs: Any = None) -> PackContents:
    """Read and fully validate the pack in a folder (local, or a path on the fsspec filesystem ``fs``)."""
    src = PackSource(os.fspath(folder_or_fs_path), fs=fs)
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
    "SCHEMA_VERSION", "MANIFEST_FILE", "TENSOR_FILE", "CalibrationEntry", "Manifest", "PackContents", "Expectations",
    "build_pack", "with_calibration", "write_pack", "read_pack", "compute_version", "canonical_json",
    "parse_manifest", "pack_files", "load_from_source", "PackSource", "check_expectations", "replace_fields",
    "validate_tensors", "describe", "NAME_RE", "VERSION_RE",
]
