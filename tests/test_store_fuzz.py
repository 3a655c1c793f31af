"""Fuzz the reader: random byte flips, truncations and JSON mutations of the manifest and the tensor header.

Every outcome must be a load that equals the original pack, or a PackError; never another exception, and no
thread left behind. Mutated manifests and headers are tried both as they are (the hash layer refuses them)
and resealed (correct sha256 and version), so the parsers behind the hash layer are exercised too.
Bounded: ``SENSEPACK_FUZZ_CASES`` (default 400) cases per test, seeded for reproducibility.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import struct
import threading
from typing import Any

import pytest
import torch

from edits_store import PackError, read_pack
from edits_store.format import MANIFEST_FILE, TENSOR_FILE, compute_version, pack_files
from tests.test_store_fixtures import make_pack

CASES = int(os.environ.get("SENSEPACK_FUZZ_CASES", "400"))
ORIGINAL = make_pack(7, n=6, d=4)
FILES = pack_files(ORIGINAL)

_WEIRD: list[Any] = [  # JSON values of every kind (and some no JSON parser makes)
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**64,
    -(2**63),
    1e308,
    "",
    "x",
    "\x00",
    [],
    {},
    [0, 1],
    {"a": 1},
    [0.5, 1.5],
    [[[[[]]]]],
    "F32",
    "I64",
    "A" * 300,
]


def _mutate_json(rng: random.Random, obj):
    """One random structural edit somewhere in a JSON value (returns the new value)."""
    if isinstance(obj, dict) and obj and rng.random() < 0.8:
        key = rng.choice(sorted(obj))
        op = rng.random()
        out = dict(obj)
        if op < 0.15:
            del out[key]
        elif op < 0.3:
            out[key + rng.choice(["", "_", "x"])] = rng.choice(_WEIRD)
        elif op < 0.45:
            out[key] = rng.choice(_WEIRD)
        else:
            out[key] = _mutate_json(rng, obj[key])
        return out
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        i = rng.randrange(len(obj))
        items = list(obj)
        op = rng.random()
        if op < 0.2:
            del items[i]
        elif op < 0.4:
            items.insert(i, rng.choice(_WEIRD))
        else:
            items[i] = _mutate_json(rng, obj[i])
        return items
    if isinstance(obj, bool) or obj is None:
        return rng.choice(_WEIRD)
    if isinstance(obj, int):
        return rng.choice([obj + 1, obj - 1, -obj, obj * 2**40, float(obj), str(obj), rng.choice(_WEIRD)])
    if isinstance(obj, float):
        return rng.choice([obj * 2, -obj, int(obj), 1e308 * 10 if rng.random() < 0.1 else 0.0, rng.choice(_WEIRD)])
    if isinstance(obj, str):
        return rng.choice([obj + "\n", obj[:-1], obj.upper(), "", rng.choice(_WEIRD)])
    return rng.choice(_WEIRD)


def _flip(rng: random.Random, data: bytes, count: int) -> bytes:
    buf = bytearray(data)
    for _ in range(count):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _header_split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _reseal(manifest: dict, tensor: bytes) -> bytes:
    m = dict(manifest, files={TENSOR_FILE: hashlib.sha256(tensor).hexdigest()})
    with contextlib.suppress(TypeError, ValueError):  # not canonical JSON (e.g. inf): left as it was; refused anyway
        m["version"] = compute_version(m)
    return json.dumps(m).encode()


def _case(rng: random.Random) -> tuple[bytes, bytes, bool]:
    """(manifest bytes, tensor bytes, resealed) for one fuzz case."""
    manifest = json.loads(FILES[MANIFEST_FILE])
    tensor = FILES[TENSOR_FILE]
    kind = rng.randrange(7)
    if kind == 0:  # byte flips in the tensor file
        return FILES[MANIFEST_FILE], _flip(rng, tensor, rng.randint(1, 4)), False
    if kind == 1:  # byte flips in the manifest
        return _flip(rng, FILES[MANIFEST_FILE], rng.randint(1, 4)), tensor, False
    if kind == 2:  # truncations of either file
        if rng.random() < 0.5:
            return FILES[MANIFEST_FILE], tensor[: rng.randrange(len(tensor))], False
        return FILES[MANIFEST_FILE][: rng.randrange(len(FILES[MANIFEST_FILE]))], tensor, False
    if kind in (3, 4):  # JSON mutation of the manifest, as is or resealed
        mutated = manifest
        for _ in range(rng.randint(1, 3)):
            mutated = _mutate_json(rng, mutated)
        if kind == 4 and isinstance(mutated, dict):
            return _reseal(mutated, tensor), tensor, True
        return json.dumps(mutated).encode(), tensor, False
    # JSON mutation of the tensor header, with the manifest resealed to it (kind 5) or not (kind 6)
    header, body = _header_split(tensor)
    for _ in range(rng.randint(1, 3)):
        header = _mutate_json(rng, header)
    raw = json.dumps(header).encode()
    if rng.random() < 0.2:
        raw += b" " * rng.randrange(8)  # safetensors pads headers with spaces
    new_tensor = struct.pack("<Q", len(raw)) + raw + body
    if kind == 5:
        return _reseal(manifest, new_tensor), new_tensor, True
    return FILES[MANIFEST_FILE], new_tensor, False


def _same(pack) -> bool:
    return (
        pack.version == ORIGINAL.version
        and torch.equal(pack.token_ids, ORIGINAL.token_ids)
        and torch.equal(pack.sense_ids, ORIGINAL.sense_ids)
        and torch.equal(pack.deltas, ORIGINAL.deltas)
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_every_mutation_loads_the_original_or_is_a_pack_error(tmp_path, seed):
    rng = random.Random(seed)
    folder = tmp_path / "p"
    folder.mkdir()
    outcomes = {"original": 0, "refused": 0, "other_valid": 0}
    refused_by: dict[str, int] = {}
    for i in range(CASES // 2):
        manifest_bytes, tensor_bytes, resealed = _case(rng)
        (folder / MANIFEST_FILE).write_bytes(manifest_bytes)
        (folder / TENSOR_FILE).write_bytes(tensor_bytes)
        try:
            pack = read_pack(folder)
        except PackError as exc:
            outcomes["refused"] += 1
            refused_by[f"{type(exc).__name__}/{exc.check}"] = refused_by.get(f"{type(exc).__name__}/{exc.check}", 0) + 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {i} (seed {seed}) raised {type(exc).__name__}: {exc}")
        if _same(pack):
            outcomes["original"] += 1
        else:
            # Only a resealed edit that is still a valid pack (e.g. a changed evaluation record) may load as
            # something else: as exactly what it now says, with the original tensors.
            assert resealed, f"case {i}: unsealed mutated bytes loaded as a different pack"
            assert torch.equal(pack.deltas, ORIGINAL.deltas) and pack.version == compute_version(
                json.loads(manifest_bytes)
            ), f"case {i}: a mutation loaded as different tensors"
            outcomes["other_valid"] += 1
    # no hash thread outlives a load (threads of earlier tests may end meanwhile: count ours only)
    assert not [t for t in threading.enumerate() if t.name == "pack-sha256"]
    assert outcomes["refused"] > CASES // 4, outcomes
    print(seed, outcomes, dict(sorted(refused_by.items())))
