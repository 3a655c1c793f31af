"""The large model: any transformers causal LM (GPT-J-6B by default); the pairing check that its
output rows cover the tokenizer's ids is `Ensemble`'s (ensemble.vocab).

`LargeModelBatch` is the large model's half of a decode batch: a left-padded
KV cache that sequences join (prefilled alone, then padded in) and leave
(rows dropped) between steps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache, GPTJConfig, GPTJForCausalLM, PreTrainedModel

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


def model_fingerprint(model: PreTrainedModel, sample: int = 4096) -> str:
    """Identity of the large model a β was calibrated for: class, config, every weight's name,
    shape and dtype, and an evenly strided sample of each weight's values.

    Sampling keeps this to milliseconds for a 6B model on GPU (hashing 12 GB would take
    tens of seconds at every start); any retrain or different checkpoint changes the
    sampled values. A different dtype is a different target: calibrate β for the dtype served.
    """
    cached = getattr(model, "_sensepack_fingerprint", None)
    if isinstance(cached, str):
        return cached
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(flat[::step][:sample].to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    fingerprint = "sha256:" + h.hexdigest()
    model._sensepack_fingerprint = fingerprint  # type: ignore[assignment]  # memo on the model object
    return fingerprint


def model_context_limit(model: PreTrainedModel) -> int:
    cfg = model.config
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 2048
    return int(limit)


def _layer_kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers cache layer's (keys, values); layers without both (linear attention) are refused."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"cache layer {type(layer).__name__} has no key/value tensors: unsupported large model")
    return keys, values


@dataclass
class LargeModelBatch:
    """Left-padded KV cache: row b's real tokens are the columns where mask[b] == 1."""

    model: PreTrainedModel
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (b, L) long
    n_real: torch.Tensor | None = None  # (b,) tokens processed per row = next position id

    @property
    def batch_size(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @torch.no_grad()
    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        """Run each new row alone (no padding inside a prompt), then pad it into the batch.

        Returns the new rows' next-token logits (n, V), float32.
        """
        device = self.model.device
        logits, kvs = [], []
        for ids in rows:
            out = self.model(torch.tensor([ids], device=device), use_cache=True)
            logits.append(out.logits[0, -1].float())
            kvs.append([_layer_kv(layer) for layer in out.past_key_values.layers])
        lengths = [len(r) for r in rows]
        self._join(kvs, lengths)
        return torch.stack(logits)

    def _join(self, kvs: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int]) -> None:
        device = self.model.device
        old_len = 0 if self.mask is None else self.mask.shape[1]
        width = max([old_len, *lengths])
        n_layer = len(kvs[0])
        layers = []
        for i in range(n_layer):
            ks, vs = [], []
            if self.cache is not None:
                k, v = _layer_kv(self.cache.layers[i])
                ks.append(_left_pad(k, width))
                vs.append(_left_pad(v, width))
            ks += [_left_pad(kv[i][0], width) for kv in kvs]
            vs += [_left_pad(kv[i][1], width) for kv in kvs]
            layers.append((torch.cat(ks), torch.cat(vs)))
        new_mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
        for r, n in enumerate(lengths):
            new_mask[r, width - n :] = 1
        masks = [new_mask] if self.mask is None else [_left_pad(self.mask, width), new_mask]
        self.mask = torch.cat(masks)
        n_new = torch.tensor(lengths, dtype=torch.long, device=device)
        self.n_real = n_new if self.n_real is None else torch.cat([self.n_real, n_new])
        self.cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)

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
        )
        self.cache = out.past_key_values
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
        layers = [(k[idx, :, start:], v[idx, :, start:]) for k, v in map(_layer_kv, self.cache.layers)]
        self.cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        self.mask = mask[:, start:]
        self.n_real = self.n_real[idx]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence dimension (-2 for K/V, -1 for masks) on the left with zeros."""
    if t.dim() == 2:
        return F.pad(t, (width - t.shape[-1], 0))
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


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
