"""Loading a version: the reading pipeline of edits_store.format's docstring, stage by stage."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..errors import (
    HashMismatchError,
    IncompatiblePackError,
    MissingFileError,
    PackNotFoundError,
    SchemaError,
    SignatureError,
)
from .bounded_io import PackFiles, hash_failure
from .contents import Expectations, PackContents
from .manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_FILE,
    TENSOR_FILE,
    VERSION_LENGTH,
    Manifest,
    content_digest,
    parse_manifest_raw,
)
from .tensors import parse_safetensors, tensor_file_cap, validate_tensors

log = logging.getLogger("edits_store.format")


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
    the manifest commits them). Every failure is a ``PackError``; no thread or buffer outlives the call. The
    stages, in the order of edits_store.format's docstring (the first failure wins): `read_manifest_bytes`,
    `verified_manifest`, `verified_tensors`, `verified_signature`, `check_expectations`.
    """
    src.check_confined()
    if manifest_bytes is None:
        manifest_bytes = read_manifest_bytes(src)
    manifest, digest = verified_manifest(manifest_bytes, src.label, expect_name, expect_version)
    label = f"{manifest.ref} ({src.location})" if src.label == src.location else src.label
    tensors = verified_tensors(src, manifest, expect, label)
    signature = verified_signature(src, manifest, digest, expect, label)
    check_expectations(manifest, expect, source=label)
    return PackContents(
        manifest=manifest,
        token_ids=tensors["token_ids"],
        sense_ids=tensors["sense_ids"],
        deltas=tensors["deltas"],
        signature=signature,
    )


def read_manifest_bytes(src: PackFiles) -> bytes:
    """1. manifest.json, a regular file of at most MAX_MANIFEST_BYTES (no folder: PackNotFoundError)."""
    try:
        return src.read(MANIFEST_FILE, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        if not src.folder_exists():
            raise PackNotFoundError(f"no pack folder at {src.location}", pack=src.label, check="exists") from None
        raise MissingFileError(
            "manifest.json is missing", pack=src.label, file=MANIFEST_FILE, check="file_present"
        ) from None


def verified_manifest(
    manifest_bytes: bytes, label: str, expect_name: str | None, expect_version: str | None
) -> tuple[Manifest, str]:
    """2. Strict JSON, schema and fields; the version is the content hash; name and version match where the
    pack was found. Returns the manifest and its full content digest (what a signature signs)."""
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
    return manifest, digest


def verified_tensors(
    src: PackFiles, manifest: Manifest, expect: Expectations | None, label: str
) -> dict[str, torch.Tensor]:
    """3. The tensor file, read within the cap its declared n × d implies and hashed while read; only bytes
    known to be the published ones are parsed (safetensors header, names, dtypes, shapes), then checked
    (NaN/Inf, id ranges against the pack or the served models, unique pairs)."""
    expected_sha = manifest.files[TENSOR_FILE]
    try:
        data, actual = src.read_hashing(TENSOR_FILE, tensor_file_cap(manifest))
    except FileNotFoundError:
        raise MissingFileError(
            f"{TENSOR_FILE} is listed in the manifest but absent", pack=label, file=TENSOR_FILE, check="file_present"
        ) from None
    if actual != expected_sha:
        raise hash_failure(TENSOR_FILE, data, expected_sha, actual, label)
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
    return tensors


def verified_signature(
    src: PackFiles, manifest: Manifest, digest: str, expect: Expectations | None, label: str
) -> bytes | None:
    """4. When the caller trusts keys: signature.json present and signed by one of them over the content
    digest (None when no key is trusted: the signature is not read)."""
    if expect is None or expect.trusted_keys is None:
        return None
    from ..signing import verify_signature  # cryptography is needed only where signatures are required

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
    return signature


def read_pack(
    folder_or_fs_path: str | os.PathLike[str], *, expect: Expectations | None = None, fs: Any = None
) -> PackContents:
    """Read and fully validate the pack in a folder (local, or a path on the fsspec filesystem ``fs``)."""
    src = PackFiles(os.fspath(folder_or_fs_path), fs=fs)
    return load_from_source(src, expect=expect)
