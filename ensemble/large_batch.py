"""The large model's half of a decode batch: `LargeModelBatch`, a left-padded KV cache that sequences join
(prefilled alone, or chunk by chunk, then padded in) and leave (rows dropped) between steps; `full_logits`, the
plain full forward it is checked against.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import DynamicLayer


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
