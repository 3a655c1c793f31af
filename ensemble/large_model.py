"""The large model: any transformers causal LM (GPT-J-6B by default); the pairing check that its
output rows cover the tokenizer's ids is `Ensemble`'s (ensemble.vocab).

`LargeModelBatch` is the large model's half of a decode batch: a left-padded
KV cache that sequences join (prefilled alone, then padded in) and leave
(rows dropped) between steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GPTJConfig,
    GPTJForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import DynamicLayer

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


def model_fingerprint(model: PreTrainedModel, sample: int = FINGERPRINT_SAMPLE) -> str:
    """Identity of the large model a β was calibrated for: class, config, every weight's name,
    shape and dtype, and an evenly strided sample of each weight's values.

    Sampling keeps this to milliseconds for a 6B model on GPU (hashing 12 GB would take
    tens of seconds at every start); any retrain or different checkpoint changes the
    sampled values. A different dtype is a different target: calibrate β for the dtype served.
    `large_model_info_from_checkpoint` computes the same value from the checkpoint files alone.
    """
    cached = getattr(model, "_sensepack_fingerprint", None)
    if isinstance(cached, str):
        return cached
    state = model.state_dict()

    def read_sample(key: str, step: int, count: int) -> torch.Tensor:
        return state[key].detach().reshape(-1)[::step][:count]

    entries = {key: (tuple(t.shape), t.dtype) for key, t in state.items()}
    fingerprint = _hash_fingerprint(type(model).__name__, model.config, entries, read_sample, sample)
    model._sensepack_fingerprint = fingerprint  # type: ignore[assignment]  # memo on the model object
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


def _layer_kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers cache layer's (keys, values); layers without both (linear attention) are refused."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"cache layer {type(layer).__name__} has no key/value tensors: unsupported large model")
    return keys, values


@dataclass
class _Partial:
    """A row part-way through a chunked prefill: its own KV cache and the tokens already in it."""

    cache: Any = None  # transformers DynamicCache
    done: int = 0


@dataclass
class LargeModelBatch:
    """Left-padded KV cache: row b's real tokens are the columns where mask[b] == 1."""

    model: PreTrainedModel
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (b, L) long
    n_real: torch.Tensor | None = None  # (b,) tokens processed per row = next position id
    # Keep the final hidden states (the LM head's input; a sense head's α reads them), from the same forward as
    # the logits: step_hidden (b, d) of the last step; prefill_chunks returns each chunk's.
    want_hidden: bool = False
    step_hidden: torch.Tensor | None = None
    # rows being prefilled in chunks (prefill_chunks): key -> their own cache so far; and the final hidden
    # states of an unfinished row's last chunk (a finished row's come back with its logits)
    _partial: dict[Hashable, _Partial] = field(default_factory=dict)
    chunk_hidden: dict[Hashable, torch.Tensor | None] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @torch.no_grad()
    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        """Run each new row alone (no padding inside a prompt), then pad it into the batch: `prefill_chunks`
        with every row whole. Returns the new rows' next-token logits (n, V), float32.
        """
        keys = [object() for _ in rows]  # never a key of a row part-way through prefill_chunks
        done = self.prefill_chunks([(k, ids, len(ids)) for k, ids in zip(keys, rows, strict=True)])
        return torch.stack([z for _, z, _ in done])

    @torch.no_grad()
    def prefill_chunks(
        self, work: list[tuple[Hashable, list[int], int]]
    ) -> list[tuple[Hashable, torch.Tensor, torch.Tensor | None]]:
        """Chunked prefill: for each (key, row ids, n), feed the row's next n tokens through the model on its
        own KV cache (kept between calls: a long prompt spans several calls, decode steps in between). Rows
        whose last token went in are padded into the batch, in `work` order, and returned as (key, next-token
        logits (V,) float32, final hidden states of the chunk (n, d) or None). Exactly the unchunked forward:
        each chunk attends to the row's cached keys and values at its true positions."""
        device = self.model.device
        finished, kvs, lengths = [], [], []
        for key, ids, n in work:
            part = self._partial.setdefault(key, _Partial())
            chunk = ids[part.done : part.done + n]
            if not chunk:
                raise ValueError(f"prefill_chunks: row {key!r} has no tokens left to prefill")
            pos = torch.arange(part.done, part.done + len(chunk), device=device)[None]
            out = self.model(
                torch.tensor([chunk], device=device),
                position_ids=pos,
                past_key_values=part.cache,
                use_cache=True,
                output_hidden_states=self.want_hidden,
                logits_to_keep=1,  # the LM head on the last position only (a fifth of a prefill's work otherwise)
            )
            part.cache, part.done = out.past_key_values, part.done + len(chunk)
            hidden = out.hidden_states[-1][0] if self.want_hidden else None
            if part.done == len(ids):
                del self._partial[key]
                finished.append((key, out.logits[0, -1].float(), hidden))
                kvs.append([_layer_kv(layer) for layer in part.cache.layers])
                lengths.append(len(ids))
            else:
                self.chunk_hidden[key] = hidden
        if finished:
            self._join(kvs, lengths)
        return finished

    def prefilling(self, key: Hashable) -> int:
        """Tokens of row `key` already prefilled (0: not started)."""
        part = self._partial.get(key)
        return 0 if part is None else part.done

    def drop_partial(self, key: Hashable) -> None:
        """Forget a row whose prefill had not finished (the request left)."""
        self._partial.pop(key, None)
        self.chunk_hidden.pop(key, None)

    def _join(self, kvs: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int]) -> None:
        device = self.model.device
        old_len = 0 if self.mask is None else self.mask.shape[1]
        width = max([old_len, *lengths])
        layers = []
        for i in range(len(kvs[0])):
            parts = [kv[i] for kv in kvs]
            if self.cache is not None:
                parts.insert(0, _layer_kv(self.cache.layers[i]))
            (k, _), (v, _) = _stack_left(p[0] for p in parts), _stack_left(p[1] for p in parts)
            layers.append((k, v))
        new_mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
        for r, n in enumerate(lengths):
            new_mask[r, width - n :] = 1
        masks = [new_mask] if self.mask is None else [_left_pad(self.mask, width), new_mask]
        self.mask = torch.cat(masks)
        n_new = torch.tensor(lengths, dtype=torch.long, device=device)
        self.n_real = n_new if self.n_real is None else torch.cat([self.n_real, n_new])
        self.cache = _cache_of(layers, width, self.model.config)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, advance: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per row; rows with advance=False get a masked placeholder column.

        Returns next-token logits (b, V), float32 (placeholder rows' logits are meaningless).
        """
        if self.mask is None or self.n_real is None:
            raise ValueError("LargeModelBatch.step: the batch is empty (prefill rows first)")
        b = self.batch_size
        device = self.model.device
        if advance is None:
            advance = torch.ones(b, dtype=torch.bool, device=device)
        self.mask = torch.cat([self.mask, advance.long()[:, None]], dim=1)
        out = self.model(
            input_ids=tokens.view(b, 1).to(device),
            attention_mask=self.mask,
            position_ids=self.n_real.view(b, 1),
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=self.want_hidden,
        )
        self.cache = out.past_key_values
        self.step_hidden = out.hidden_states[-1][:, -1] if self.want_hidden else None
        self.n_real = self.n_real + advance.long()
        return out.logits[:, -1].float()

    def select(self, rows: list[int]) -> None:
        """Keep only `rows`, then drop leading columns that are padding in every remaining row."""
        if not rows:
            self.cache, self.mask, self.n_real = None, None, None
            return
        if self.cache is None or self.mask is None or self.n_real is None:
            raise ValueError(f"LargeModelBatch.select: rows {rows} of an empty batch")
        idx = torch.tensor(rows, dtype=torch.long, device=self.model.device)
        mask = self.mask[idx]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        layers = [
            (_with_room(k[idx, :, start:], k.shape[-2] - start), _with_room(v[idx, :, start:], v.shape[-2] - start))
            for k, v in map(_layer_kv, self.cache.layers)
        ]
        self.cache = _cache_of(layers, mask.shape[1] - start, self.model.config)
        self.mask = mask[:, start:]
        self.n_real = self.n_real[idx]


class _SlackLayer(DynamicLayer):
    """A cache layer whose keys and values are views of buffers with spare columns, so a decode step writes its
    column in place: DynamicLayer.update concatenates, copying the whole batch's cache at every step (two
    thirds of a decode step once a long row has widened the batch)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int):
        """`keys`, `values`: (b, h, capacity, d) buffers whose first `width` columns hold the cache."""
        super().__init__()  # type: ignore[no-untyped-call]
        self.lazy_initialization(keys, values)
        self._k, self._v, self._n = keys, values, width
        self.keys, self.values = keys[..., :width, :], values[..., :width, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, q = self._n, key_states.shape[-2]
        if n + q > self._k.shape[-2]:
            self._k, self._v = _with_room(self._k[..., :n, :], n + q), _with_room(self._v[..., :n, :], n + q)
        self._k[..., n : n + q, :] = key_states
        self._v[..., n : n + q, :] = value_states
        self._n = n + q
        keys, values = self._k[..., : n + q, :], self._v[..., : n + q, :]
        self.keys, self.values = keys, values
        return keys, values


def _room(width: int) -> int:
    """Columns to allocate for a cache of `width`: a quarter more (at least 32), so the buffer is copied once
    every width/4 steps instead of at every step."""
    return width + max(32, width // 4)


def _with_room(t: torch.Tensor, width: int) -> torch.Tensor:
    """A (b, h, _room(width), d) buffer starting with `t`'s columns."""
    out = t.new_empty((*t.shape[:2], _room(width), t.shape[-1]))
    out[..., : t.shape[-2], :] = t
    return out


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]], width: int, config: PretrainedConfig) -> DynamicCache:
    """A DynamicCache over these (keys, values) buffers, whose first `width` columns hold the cache, used as they
    are (`DynamicCache(ddp_cache_data=...)` would copy each layer again) and grown in place by decode steps."""
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(layers) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        # sliding-window or linear-attention layers keep their own update rules
        return DynamicCache(ddp_cache_data=[(k[..., :width, :], v[..., :width, :]) for k, v in layers], config=config)
    cache.layers = [_SlackLayer(k, v, width) for k, v in layers]
    return cache


def _stack_left(parts: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Rows (b_i, h, n_i, d) stacked into one buffer (Σb_i, h, _room(w), d) whose first w = max n_i columns hold
    them, each right-aligned (left padding with zeros); every value is written once. Returns (buffer, w)."""
    parts = list(parts)
    width = max(p.shape[-2] for p in parts)
    first = parts[0]
    out = first.new_empty((sum(p.shape[0] for p in parts), first.shape[1], _room(width), first.shape[-1]))
    row = 0
    for p in parts:
        out[row : row + p.shape[0], :, : width - p.shape[-2]] = 0
        out[row : row + p.shape[0], :, width - p.shape[-2] : width] = p
        row += p.shape[0]
    return out, width


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A (b, L) mask padded on the left with zeros to `width` columns (K/V are stacked by `_stack_left`)."""
    return F.pad(mask, (width - mask.shape[-1], 0))


@torch.no_grad()
def full_logits(model: PreTrainedModel, rows: list[list[int]]) -> list[torch.Tensor]:
    """Teacher-forced logits (len, V) of each row, right-padded in one batch (scoring, calibration)."""
    device = model.device
    b, s = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    mask = torch.zeros(b, s, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, device=device)
        mask[i, : len(r)] = 1
    pos = torch.arange(s, device=device).expand(b, s)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    return [logits[i, : len(r)] for i, r in enumerate(rows)]
