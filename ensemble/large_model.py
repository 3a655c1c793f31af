"""The large model: any transformers causal LM (GPT-J-6B by default), loaded, fingerprinted and described
(from the loaded model or from its checkpoint's headers alone); the pairing check that its output rows cover the
tokenizer's ids is `Ensemble`'s (ensemble.vocab). Its half of a decode batch is `ensemble.large_batch`.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

DEFAULT_LARGE_MODEL = "EleutherAI/gpt-j-6b"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_large_model(
    name_or_path: str = DEFAULT_LARGE_MODEL, dtype: str | torch.dtype | None = None, device: str = "cpu"
) -> PreTrainedModel:
    """Load a causal LM by hub id or folder, in eval mode (`Ensemble` checks it covers the tokenizer)."""
    from .zoo import resolve_path

    # Registry names (ensemble.zoo, e.g. "smollm2-135m-instruct") resolve to their cached folder.
    model = AutoModelForCausalLM.from_pretrained(resolve_path(name_or_path), dtype=parse_dtype(dtype) or "auto")
    model.to(device).eval()  # type: ignore[arg-type]  # transformers types its wrapped .to() as unbound
    return model


def tiny_gptj(seed: int = 0, **overrides: Any) -> GPTJForCausalLM:
    """GPT-J's real architecture at test size (vocab 50400 as the real one), random weights."""
    cfg: dict[str, Any] = dict(
        vocab_size=50400,
        n_positions=2048,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        bos_token_id=50256,
        eos_token_id=50256,
        attn_implementation="eager",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPTJForCausalLM(GPTJConfig(**cfg)).eval()
    return model


# Config keys that do not change the function the model computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_attn_implementation",
    "attn_implementation",
    "_attn_implementation_internal",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "_commit_hash",
}


FINGERPRINT_SAMPLE = 4096  # values sampled per state_dict entry

# (key, step, count) -> the entry's values flat[::step][:count], in the entry's dtype.
_SampleReader = Callable[[str, int, int], torch.Tensor]


def _hash_fingerprint(
    architecture: str,
    config: PretrainedConfig,
    entries: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    read_sample: _SampleReader,
    sample: int,
) -> str:
    """The one hashing loop behind `model_fingerprint` and `large_model_info_from_checkpoint`.

    `entries` maps every state_dict key to its (shape, dtype) as the loaded model holds it;
    `read_sample` yields the strided sample of its values, already in that dtype.
    """
    cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256(architecture.encode())
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for key in sorted(entries):
        shape, dtype = entries[key]
        numel = math.prod(shape)
        step = max(1, numel // sample)
        count = min(sample, -(-numel // step))  # len(flat[::step][:sample])
        values = read_sample(key, step, count)
        if values.dtype != dtype or tuple(values.shape) != (count,):
            raise AssertionError(f"{key}: sample is {values.dtype} {tuple(values.shape)}, expected {dtype} ({count},)")
        h.update(f"{key}:{tuple(shape)}:{dtype}".encode())
        h.update(values.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


# model -> its fingerprint, computed once per model object (a served model's weights do not change)
_FINGERPRINTS: weakref.WeakKeyDictionary[PreTrainedModel, str] = weakref.WeakKeyDictionary()


def model_fingerprint(model: PreTrainedModel, sample: int = FINGERPRINT_SAMPLE, fresh: bool = False) -> str:
    """Identity of the large model a β was calibrated for: class, config, every weight's name,
    shape and dtype, and an evenly strided sample of each weight's values.

    Sampling keeps this to milliseconds for a 6B model on GPU (hashing 12 GB would take
    tens of seconds at every start); any retrain or different checkpoint changes the
    sampled values. A different dtype is a different target: calibrate β for the dtype served.
    `large_model_info_from_checkpoint` computes the same value from the checkpoint files alone.
    Remembered per model object; `fresh` computes it again (after changing the weights in place).
    """
    cached = None if fresh or sample != FINGERPRINT_SAMPLE else _FINGERPRINTS.get(model)
    if cached is not None:
        return cached
    state = model.state_dict()

    def read_sample(key: str, step: int, count: int) -> torch.Tensor:
        return state[key].detach().reshape(-1)[::step][:count]

    entries = {key: (tuple(t.shape), t.dtype) for key, t in state.items()}
    fingerprint = _hash_fingerprint(type(model).__name__, model.config, entries, read_sample, sample)
    if sample == FINGERPRINT_SAMPLE:
        _FINGERPRINTS[model] = fingerprint
    return fingerprint


def _context_limit(config: PretrainedConfig) -> int:
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 2048
    return int(limit)


def model_context_limit(model: PreTrainedModel) -> int:
    return _context_limit(model.config)


@dataclass(frozen=True)
class LargeModelInfo:
    """What a server needs to know of its large model, whether it loaded it or vLLM serves it."""

    name: str  # as asked for (hub id, folder or zoo name)
    fingerprint: str  # model_fingerprint of the model as loaded in `dtype`
    architecture: str  # class name, e.g. GPTJForCausalLM
    vocab_rows: int  # output embedding rows
    context_limit: int  # as model_context_limit
    dtype: str  # e.g. "float32", "bfloat16"
    device: str


def _describe(model: PreTrainedModel, name: str, fingerprint: str, device: str | None) -> LargeModelInfo:
    first = next(model.parameters())
    out = model.get_output_embeddings()
    weight = getattr(out, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name}: {type(model).__name__} has no output embedding weight")
    return LargeModelInfo(
        name=name,
        fingerprint=fingerprint,
        architecture=type(model).__name__,
        vocab_rows=int(weight.shape[0]),
        context_limit=_context_limit(model.config),
        dtype=str(first.dtype).removeprefix("torch."),
        device=str(first.device) if device is None else device,
    )


def large_model_info(model: PreTrainedModel, name: str) -> LargeModelInfo:
    """The info of a loaded large model (device and dtype from its first parameter)."""
    return _describe(model, name, model_fingerprint(model), None)


# safetensors dtype -> (numpy dtype of the stored bytes, torch dtype to view them as, if numpy has none)
_ST_DTYPES: dict[str, tuple[str, torch.dtype | None]] = {
    "F64": ("<f8", None),
    "F32": ("<f4", None),
    "F16": ("<f2", None),
    "BF16": ("<u2", torch.bfloat16),
    "F8_E4M3": ("u1", torch.float8_e4m3fn),
    "F8_E5M2": ("u1", torch.float8_e5m2),
    "I64": ("<i8", None),
    "I32": ("<i4", None),
    "I16": ("<i2", None),
    "I8": ("i1", None),
    "U8": ("u1", None),
    "BOOL": ("?", None),
}


@dataclass(frozen=True)
class _StoredTensor:
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in `file`
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        np_dtype, view = _ST_DTYPES[self.dtype]
        return view if view is not None else torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


def _read_safetensors_header(path: Path) -> dict[str, _StoredTensor]:
    """The tensors of one .safetensors file, from its header alone (8-byte LE length + JSON)."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        raw = fh.read(n)
    if len(raw) != n:
        raise ValueError(f"{path}: truncated safetensors header ({len(raw)} of {n} bytes)")
    data_start = 8 + n
    out = {}
    for key, meta in json.loads(raw).items():
        if key == "__metadata__":
            continue
        dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {key} has unsupported safetensors dtype {dtype}")
        itemsize = np.dtype(_ST_DTYPES[dtype][0]).itemsize
        if end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"{path}: tensor {key} spans {end - begin} bytes, not {shape} x {itemsize}")
        out[key] = _StoredTensor(path, dtype, shape, data_start + begin, data_start + end)
    return out


def _checkpoint_tensors(folder: Path) -> tuple[dict[str, _StoredTensor], list[Path], dict[str, Any]]:
    """Every tensor of the folder's safetensors checkpoint, the files in transformers' order
    (single file, else the index's sorted shards), and the index's metadata."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():  # transformers prefers the single file when both exist
        return _read_safetensors_header(single), [single], {}
    if index.is_file():
        meta = json.loads(index.read_text())
        files = [folder / f for f in sorted(set(meta["weight_map"].values()))]
        tensors: dict[str, _StoredTensor] = {}
        for f in files:
            if not f.is_file():
                raise ValueError(f"{folder}: shard {f.name} named by {index.name} is missing")
            tensors.update(_read_safetensors_header(f))
        return tensors, files, dict(meta.get("metadata") or {})
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise ValueError(
        f"{folder}: no safetensors checkpoint (model.safetensors or model.safetensors.index.json); "
        f"found {present}. The fingerprint is read from safetensors only: convert the weights "
        "(save_pretrained writes safetensors) or load the model with load_large_model"
    )


def _read_strided(mm: mmap.mmap, t: _StoredTensor, step: int, count: int) -> torch.Tensor:
    """flat[::step][:count] of a stored tensor, touching only the pages of the sampled elements."""
    np_dtype, view = _ST_DTYPES[t.dtype]
    numel = math.prod(t.shape)
    if count == 0:
        values = np.zeros(0, dtype=np_dtype)
    else:
        flat = np.frombuffer(mm, dtype=np_dtype, count=numel, offset=t.start)
        values = np.array(flat[::step][:count])  # copies the sampled elements only
        del flat  # release the buffer export so the map can close
    out = torch.from_numpy(values)
    return out.view(view) if view is not None else out


def _local_folder(name_or_path: str | os.PathLike[str], download: bool = False) -> Path:
    """A folder, or a hub id in the local HF cache; with `download`, a hub id not cached yet is fetched into
    that cache (its config and safetensors only: what vLLM, using the same cache, then finds there)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        if download:
            return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors"]))
        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception as e:
        raise ValueError(
            f"{name_or_path}: not a local folder nor a hub id in the local cache ({e})"
            + ("" if download else "; nothing is downloaded without download=True")
        ) from e


def _auto_dtype(
    config: PretrainedConfig, files: list[Path], tensors: dict[str, _StoredTensor], index_meta: dict[str, Any]
) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` picks: the config's, else the index metadata's,
    else the first floating tensor's (sorted keys) of the first checkpoint file."""
    chosen: Any = getattr(config, "dtype", None)
    if chosen is None:
        chosen = index_meta.get("dtype")
    if chosen is None:
        first = sorted((k, t) for k, t in tensors.items() if t.file == files[0])
        dtypes = [t.torch_dtype for _, t in first]
        floats = [d for d in dtypes if d.is_floating_point and "float8_" not in str(d) and "float4_" not in str(d)]
        chosen = floats[0] if floats else (dtypes[0] if dtypes else torch.float32)
    if isinstance(chosen, str):
        chosen = getattr(torch, chosen)
    if not isinstance(chosen, torch.dtype):
        raise ValueError(f"cannot resolve dtype 'auto' from {chosen!r}")
    return chosen


def large_model_info_from_checkpoint(
    name_or_path: str, dtype: str | torch.dtype | None = None, device: str = "vllm", download: bool = False
) -> LargeModelInfo:
    """The info (fingerprint included) of `load_large_model(name_or_path, dtype)`, without loading it.

    For a server whose large model runs elsewhere (vLLM): the architecture is built on the
    meta device to learn the state_dict's keys, shapes, dtypes and tied weights, and each
    entry's strided sample is read from the safetensors file(s) through a memory map, so
    only the sampled pages are read. The fingerprint equals `model_fingerprint` of the loaded
    model exactly (same sample, same dtype cast). `download`: a hub id not in the local HF cache is
    fetched into it (the server does, as loading the model would; train_edits does not).
    """
    from .zoo import resolve_path

    folder = _local_folder(resolve_path(name_or_path), download)
    tensors, files, index_meta = _checkpoint_tensors(folder)
    config = AutoConfig.from_pretrained(folder)
    target = parse_dtype(dtype) or _auto_dtype(config, files, tensors, index_meta)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=target)
    state = model.state_dict(keep_vars=True)
    buffers = {name for name, _ in model.named_buffers()}
    aliases: dict[int, list[str]] = {}
    for key, t in state.items():
        aliases.setdefault(id(t), []).append(key)
    maps: dict[Path, mmap.mmap] = {}

    def read_sample(key: str, step: int, count: int) -> torch.Tensor:
        want = state[key]
        group = [key] + sorted(k for k in aliases[id(want)] if k != key)  # tied weights share values
        present = [k for k in group if k in tensors]
        if not present:
            kind = "persistent buffer" if key in buffers else "weight"
            tied = f" (nor its tied {', '.join(group[1:])})" if len(group) > 1 else ""
            raise ValueError(
                f"{folder}: {kind} {key}{tied} of {type(model).__name__} is not in the checkpoint; "
                "the fingerprint cannot be computed without loading the model"
            )
        samples = []
        for k in present:
            stored = tensors[k]
            if stored.shape != tuple(want.shape):
                raise ValueError(f"{folder}: {k} is stored as {stored.shape}, the model has {tuple(want.shape)}")
            if stored.file not in maps:
                with stored.file.open("rb") as fh:
                    maps[stored.file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                if hasattr(mmap, "MADV_RANDOM"):
                    maps[stored.file].madvise(mmap.MADV_RANDOM)  # no read-ahead around sampled pages
            samples.append(_read_strided(maps[stored.file], stored, step, count))
        if any(not torch.equal(s, samples[0]) for s in samples[1:]):
            raise ValueError(f"{folder}: tied weights {', '.join(present)} differ in the checkpoint")
        return samples[0].to(want.dtype)  # the cast loading does

    entries = {key: (tuple(t.shape), t.dtype) for key, t in state.items()}
    try:
        fingerprint = _hash_fingerprint(type(model).__name__, model.config, entries, read_sample, FINGERPRINT_SAMPLE)
    finally:
        for m in maps.values():
            m.close()
    return _describe(model, str(name_or_path), fingerprint, device)
