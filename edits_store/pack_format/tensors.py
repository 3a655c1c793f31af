"""The three tensors of a pack: their checks (shapes, dtypes, NaN/Inf, id ranges, unique pairs),
their serialisation, and a bounded safetensors parser (header size, names, dtypes, shapes, offsets).
"""

from __future__ import annotations

import logging
import math
import struct
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from ..errors import (
    DuplicatePairError,
    NonFiniteError,
    SenseIdRangeError,
    TensorFormatError,
    TokenIdRangeError,
)
from .manifest import TENSOR_FILE, TENSOR_NAMES, Manifest
from .strict_json import strict_json_loads

log = logging.getLogger("edits_store.format")

MAX_SAFETENSORS_HEADER_BYTES = 1 << 16  # three tensor entries and a small __metadata__ fit in far less
_ST_DTYPES = {"I64": torch.int64, "F32": torch.float32}
_EXPECTED_DTYPES = {"token_ids": "I64", "sense_ids": "I64", "deltas": "F32"}


def as_ids(x: Any, field: str, pack: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TensorFormatError(f"{field} must be an integer tensor, got {t.dtype}", pack=pack, check="dtype")
    return t.to(torch.int64).contiguous()


def as_deltas(x: Any, pack: str) -> torch.Tensor:
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


def tensor_file_cap(manifest: Manifest) -> int:
    """The largest senses.safetensors a manifest can justify: header cap + 8 + n × (8 + 8 + 4 d) bytes."""
    n, d = manifest.n_senses_edited, manifest.d_model
    return 8 + MAX_SAFETENSORS_HEADER_BYTES + n * (16 + 4 * d)


def declared_safetensors_size(data: bytes | bytearray) -> int | None:
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
