"""Optional provenance: ed25519 signatures of pack versions (through the ``cryptography`` library).

A signature covers the pack's *content digest* (the full sha256 of its canonical manifest, which names the
tensor file's sha256) and its name, so it holds for exactly those bytes under that name. It lives beside the
manifest as ``signature.json``, not inside it: signing does not change the content or the version.

    {"alg": "ed25519", "key_id": "<first 16 hex of sha256(raw public key)>", "name": ..., "digest": ...,
     "signature": "<base64 of the 64-byte signature>"}

Keys: a private key is a PKCS#8 PEM file (``sensepack packs keygen`` writes one with its public half); a public
key is given as a PEM file path or as ``ed25519:<64 hex chars>`` (the raw 32 bytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import SignatureError

if TYPE_CHECKING:  # cryptography is imported where it is used: most pack reads never touch a signature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SIGNATURE_FILE = "signature.json"
_DOMAIN = b"sensepack-pack-signature-v1\n"


def _message(name: str, digest: str) -> bytes:
    return _DOMAIN + f"{name}\n{digest}".encode()


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def generate_key() -> tuple[bytes, bytes]:
    """(private key PKCS#8 PEM, public key PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not an unencrypted PEM private key: {exc}", check="signing_key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key is {type(key).__name__}, not ed25519", check="signing_key")
    return key


def public_raw(spec: str | bytes) -> bytes:
    """Raw 32-byte ed25519 public key from ``ed25519:<hex>``, PEM bytes, or a path to a PEM file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(spec, str) and spec.startswith("ed25519:"):
        try:
            raw = bytes.fromhex(spec[len("ed25519:") :])
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise SignatureError(f"{spec!r} is not ed25519:<64 hex chars>", check="trusted_key")
        return raw
    if isinstance(spec, bytes):
        pem = spec
    else:
        try:
            with open(os.path.expanduser(spec), "rb") as f:
                pem = f.read(65536)
        except OSError as exc:
            raise SignatureError(
                f"cannot read public key file {spec}: {exc.strerror or exc}", check="trusted_key"
            ) from None
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a PEM public key: {exc}", check="trusted_key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"trusted key is {type(key).__name__}, not ed25519", check="trusted_key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(private_key: Ed25519PrivateKey, *, name: str, digest: str) -> bytes:
    """signature.json bytes for the content ``digest`` of pack ``name``."""
    from cryptography.hazmat.primitives import serialization

    pub = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    doc = {
        "alg": "ed25519",
        "key_id": key_id(pub),
        "name": name,
        "digest": digest,
        "signature": base64.b64encode(private_key.sign(_message(name, digest))).decode("ascii"),
    }
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode("utf-8")


def verify_signature(data: bytes, *, name: str, digest: str, trusted: Iterable[bytes], pack: str) -> str:
    """Check signature.json bytes against the trusted raw public keys; returns the signer's key id."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    def fail(detail: str, check: str) -> SignatureError:
        return SignatureError(detail, pack=pack, file=SIGNATURE_FILE, check=check)

    try:
        doc = json.loads(data)
        kid, sig = doc["key_id"], base64.b64decode(doc["signature"], validate=True)
        if doc.get("alg") != "ed25519" or not isinstance(kid, str):
            raise ValueError("alg must be ed25519")
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise fail(f"signature.json is malformed: {exc}", "signature_format") from None
    if doc.get("name") != name or doc.get("digest") != digest:
        raise fail("signature is for other content (name or digest differ)", "signature_content")
    keys = {key_id(raw): raw for raw in trusted}
    if kid not in keys:
        raise fail(f"signed by key {kid!r:.40}, which is not among the {len(keys)} trusted key(s)", "signature_key")
    try:
        Ed25519PublicKey.from_public_bytes(keys[kid]).verify(sig, _message(name, digest))
    except InvalidSignature:
        raise fail(f"signature by key {kid} does not verify", "signature") from None
    return kid


def public_raw_of(private_key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


__all__ = [
    "SIGNATURE_FILE",
    "generate_key",
    "key_id",
    "load_private_key",
    "public_raw",
    "public_raw_of",
    "sign",
    "verify_signature",
]
