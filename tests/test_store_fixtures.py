"""Shared helpers for the edits_store tests (no tests here).

- ``make_pack(seed)``: a small deterministic pack; ``expected_edits(seed)`` regenerates its content
  independently of the store so tests can check what they read back.
- ``store_spec``: parametrized fixture, ``local`` (a tmp dir) and ``s3`` (a fresh bucket on a real
  S3-compatible server: moto's ThreadedMotoServer on 127.0.0.1, started once per test process).
- ``write_raw_pack``: write arbitrary (possibly invalid) tensors with a self-consistent manifest (correct
  sha256 and version), to exercise the reader's checks behind the hash layer.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from edits_store import CalibrationEntry, PackContents, PackStore, build_pack, open_store
from edits_store.format import compute_version
from sensepack_testing import free_port

VOCAB = 50264
SENSES = 16
BACKPACK_FP = "sha256:" + "b" * 64
TOKENIZER_FP = "sha256:" + "7" * 64
TARGET_FP = "sha256:" + "9" * 64
S3_CREDENTIALS = {"key": "testing", "secret": "testing"}

CALIBRATION = CalibrationEntry(
    target_model="tiny-gptj",
    target_fingerprint=TARGET_FP,
    beta=2.5,
    ball_ratio=1.00008,
    g_fingerprint="sha256:" + "6" * 64,
    g_tokens=4096,
    epsilon=1e-4,
)


def expected_edits(seed: int, n: int = 8, d: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, sense, delta) rows of ``make_pack(seed, n, d)``, sorted by (token, sense)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(2000 * SENSES, generator=g)[:n]  # unique pairs among the first 2000 tokens
    deltas = torch.randn(n, d, generator=g)
    order = torch.argsort(keys)
    keys, deltas = keys[order], deltas[order]
    return keys // SENSES, keys % SENSES, deltas


def make_pack(seed: int = 0, name: str = "demo", n: int = 8, d: int = 16, **overrides: Any) -> PackContents:
    tokens, senses, deltas = expected_edits(seed, n, d)
    # present rows in a scrambled order: build_pack must canonicalise it
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    kwargs: dict[str, Any] = dict(
        backpack_name="backpack-tiny",
        backpack_fingerprint=BACKPACK_FP,
        tokenizer_fingerprint=TOKENIZER_FP,
        vocab_size=VOCAB,
        num_senses=SENSES,
        epsilon=1e-4,
        calibration=[CALIBRATION],
        training={"seed": seed, "task": "country-capital", "epochs": 3},
        evaluation={"success_rate": 0.9},
    )
    kwargs.update(overrides)
    return build_pack(name, tokens[perm], senses[perm], deltas[perm], **kwargs)


def assert_content(pack: PackContents, seed: int, n: int = 8, d: int = 16) -> None:
    tokens, senses, deltas = expected_edits(seed, n, d)
    assert torch.equal(pack.token_ids, tokens)
    assert torch.equal(pack.sense_ids, senses)
    assert torch.equal(pack.deltas, deltas)


def write_raw_pack(
    folder: Path, base: PackContents, tensors: dict[str, torch.Tensor], manifest_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``tensors`` with ``base``'s manifest (plus overrides) re-sealed: correct sha256 and version."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = st_save(tensors, metadata={"format": "pt"})
    (folder / "senses.safetensors").write_bytes(blob)
    manifest = base.manifest.model_dump(mode="json")
    manifest.update(manifest_overrides or {})
    manifest["files"] = {"senses.safetensors": hashlib.sha256(blob).hexdigest()}
    manifest["version"] = compute_version(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# --------------------------------------------------------------------------- S3 (moto server on loopback)

_moto_lock = threading.Lock()
_moto: dict[str, Any] = {}


def moto_endpoint() -> str:
    """Start (once per process) moto's S3-compatible server on 127.0.0.1 and return its URL."""
    with _moto_lock:
        if "url" not in _moto:
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
            port = free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            _moto.update(server=server, url=f"http://127.0.0.1:{port}")
            atexit.register(server.stop)
        return _moto["url"]


def make_bucket(endpoint: str) -> str:
    import boto3

    bucket = "packs-" + uuid.uuid4().hex[:12]
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    return bucket


@dataclass
class StoreSpec:
    """How to open the store under test (also from a child process)."""

    kind: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None  # local only

    def open(self) -> PackStore:
        return open_store(self.url, **self.options)

    def env(self) -> dict[str, str]:
        """Environment for a CLI subprocess to reach this store."""
        env = dict(os.environ, SENSEPACK_STORE=self.url)
        if self.kind == "s3":
            env.update(
                SENSEPACK_S3_ENDPOINT_URL=self.options["endpoint_url"],
                AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing",
                AWS_DEFAULT_REGION="us-east-1",
            )
        return env


def make_store_spec(kind: str, tmp_path: Path) -> StoreSpec:
    if kind == "local":
        root = tmp_path / "store"
        return StoreSpec("local", str(root), root=root)
    endpoint = moto_endpoint()
    bucket = make_bucket(endpoint)
    return StoreSpec("s3", f"s3://{bucket}/packs", dict(endpoint_url=endpoint, **S3_CREDENTIALS))


@pytest.fixture(params=["local", "s3"])
def store_spec(request, tmp_path) -> StoreSpec:
    return make_store_spec(request.param, tmp_path)


@pytest.fixture
def store(store_spec) -> PackStore:
    return store_spec.open()
