"""A pack in memory (`PackContents`), what a reader expects of it (`Expectations`), and building one:
sorted rows, the manifest with its content hash, the files it is written as.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from ..errors import (
    HashMismatchError,
    SchemaError,
    TensorFormatError,
)
from .bounded_io import fsync_dir, fsync_write
from .manifest import (
    MANIFEST_FILE,
    NAME_RE,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    TENSOR_FILE,
    VERSION_LENGTH,
    CalibrationEntry,
    Manifest,
    canonical_json,
    compute_version,
    manifest_to_bytes,
    schema_error_detail,
    utc_now_iso,
)
from .strict_json import strict_json_loads
from .tensors import as_deltas, as_ids, serialize_tensors, validate_tensors

log = logging.getLogger("edits_store.format")


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
            schema_error_detail(exc), pack=fields.get("name"), file=MANIFEST_FILE, check="schema"
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
    tok = as_ids(token_ids, "token_ids", name)
    sen = as_ids(sense_ids, "sense_ids", name)
    dlt = as_deltas(deltas, name)
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


def write_pack(pack: PackContents, folder: str | os.PathLike[str]) -> None:
    """Write the pack's two files into ``folder`` (created if needed), tensors first, manifest last, fsynced.

    Not atomic on its own (the store is); a reader of a half-written folder fails validation rather than
    seeing a partial pack, because the manifest that lists the hashes is written last.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    files = pack_files(pack)
    for fname, data in files.items():  # dict order: tensor file first, manifest last
        fsync_write(os.path.join(folder, fname), data)
    fsync_dir(folder)
    log.info("event=pack_written pack=%s folder=%s bytes=%d", pack.ref, folder, sum(map(len, files.values())))
