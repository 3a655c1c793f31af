"""Incremental Backpack decoding: a small explicit cache, `prefill` and `decode_step`.

The cache holds, per row, the GPT-2 keys/values of every layer and the weight
network's keys for the tokens in the row's window. A step computes one query
row: the new token's hidden state and its α over the cached keys. Earlier α
rows never change, so nothing else is recomputed.

Rows have their own lengths: row b's tokens sit at slots [0, lengths[b]) and
their positions are the slot indices. Past `n_positions` a row keeps a sliding
window: when it is full, the most recent `keep` tokens are re-prefilled with
positions restarting at 0 (DESIGN §1.6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backpack import BackpackLM, add_sense_edits, causal_allowed
from .edits import SenseEdits


@dataclass
class BackpackCache:
    keys: list[torch.Tensor]  # per layer (b, heads, capacity, head_dim)
    values: list[torch.Tensor]  # per layer (b, heads, capacity, head_dim)
    weight_keys: torch.Tensor  # (b, senses, capacity, d/senses)
    tokens: torch.Tensor  # (b, capacity) window tokens, slot = position
    lengths: torch.Tensor  # (b,) tokens in each row's window
    last_alpha: torch.Tensor  # (b, senses, capacity) α of each row's last token

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.tokens.shape[1])

    def window_tokens(self, row: int) -> list[int]:
        return self.tokens[row, : int(self.lengths[row])].tolist()

    def select(self, rows: torch.Tensor) -> BackpackCache:
        """Keep only `rows` (in that order): finished sequences leave the batch."""
        return BackpackCache(
            [k[rows] for k in self.keys],
            [v[rows] for v in self.values],
            self.weight_keys[rows],
            self.tokens[rows],
            self.lengths[rows],
            self.last_alpha[rows],
        )

    @staticmethod
    def concat(caches: list[BackpackCache]) -> BackpackCache:
        """Stack rows of several caches (same capacity): new sequences join the batch."""
        caches = [c for c in caches if c.batch_size]
        if len(caches) == 1:
            return caches[0]
        n_layer = len(caches[0].keys)
        return BackpackCache(
            [torch.cat([c.keys[i] for c in caches]) for i in range(n_layer)],
            [torch.cat([c.values[i] for c in caches]) for i in range(n_layer)],
            torch.cat([c.weight_keys for c in caches]),
            torch.cat([c.tokens for c in caches]),
            torch.cat([c.lengths for c in caches]),
            torch.cat([c.last_alpha for c in caches]),
        )

    def overwrite_rows(self, rows: torch.Tensor, other: BackpackCache) -> None:
        """Replace `rows` with `other`'s rows (after a window re-prefill)."""
        for i in range(len(self.keys)):
            self.keys[i][rows] = other.keys[i]
            self.values[i][rows] = other.values[i]
        self.weight_keys[rows] = other.weight_keys
        self.tokens[rows] = other.tokens
        self.lengths[rows] = other.lengths
        self.last_alpha[rows] = other.last_alpha


def window_for(tokens: list[int], n_positions: int, keep: int) -> list[int]:
    """The window a row of this many tokens is prefilled with: all of them, or the most recent `keep`."""
    return tokens if len(tokens) <= n_positions else tokens[-keep:]


@torch.no_grad()
def prefill(model: BackpackLM, rows: list[list[int]]) -> BackpackCache:
    """Run the stack over each row's tokens (right-padded batch) and fill a fresh cache.

    Each row must fit the Backpack (≤ n_positions tokens; see `window_for`).
    """
    cfg = model.config
    cap = cfg.n_positions
    if any(len(r) == 0 or len(r) > cap for r in rows):
        raise ValueError(f"prefill: every row needs 1..{cap} tokens, got lengths {[len(r) for r in rows]}")
    device = model.embedding.device
    b, s = len(rows), max(len(r) for r in rows)
    input_ids = torch.zeros(b, s, dtype=torch.long, device=device)
    mask = torch.zeros(b, s, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, device=device)
        mask[i, : len(r)] = 1
    lengths = mask.sum(-1)
    allowed = causal_allowed(mask)
    positions = torch.arange(s, device=device).expand(b, s)

    dtype = model.embedding.dtype
    heads, hd = cfg.n_head, cfg.n_embd // cfg.n_head
    keys = [torch.zeros(b, heads, cap, hd, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
    values = [torch.zeros(b, heads, cap, hd, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
    stack = model.gpt2_model
    x = stack.drop(stack.wte(input_ids) + stack.wpe(positions))
    for i, block in enumerate(stack.blocks):
        q, k, v = block.attn.qkv(block.ln_1(x))
        keys[i][:, :, :s] = k
        values[i][:, :, :s] = v
        x = x + block.attn.attend(q, k, v, allowed)
        x = x + block.mlp(block.ln_2(x))
    h = stack.ln_f(x)

    wnet = model.sense_weight_net
    wq, wk = wnet.query_key(h)
    weight_keys = torch.zeros(b, cfg.num_senses, cap, wnet.head_dim, dtype=dtype, device=device)
    weight_keys[:, :, :s] = wk
    last = lengths - 1
    q_last = wq[torch.arange(b, device=device), :, last].unsqueeze(2)  # (b, k, 1, hd)
    last_alpha = _alpha_row(model, q_last, weight_keys, lengths)

    tokens = torch.zeros(b, cap, dtype=torch.long, device=device)
    tokens[:, :s] = input_ids
    return BackpackCache(keys, values, weight_keys, tokens, lengths, last_alpha)


def _alpha_row(model: BackpackLM, q: torch.Tensor, weight_keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """α of each row's newest token over its cached weight keys: (b, k, capacity)."""
    cap = weight_keys.shape[2]
    visible = torch.arange(cap, device=q.device)[None, :] < lengths[:, None]  # (b, cap)
    return model.sense_weight_net.weights(q, weight_keys, visible[:, None, None, :]).squeeze(2)


@torch.no_grad()
def decode_step(
    model: BackpackLM, cache: BackpackCache, next_tokens: torch.Tensor, advance: torch.Tensor | None = None
) -> torch.Tensor:
    """Append one token per row and return α of that token over the row's window, (b, k, capacity).

    `advance` (bool, b) marks the rows that really take a token this step; the
    others compute on a placeholder that is never written to the cache, and keep
    their `last_alpha`.
    Rows must have room (lengths < capacity): `slide_windows` first.
    """
    b = cache.batch_size
    device = next_tokens.device
    if advance is None:
        advance = torch.ones(b, dtype=torch.bool, device=device)
    if bool((cache.lengths[advance] >= cache.capacity).any()):
        raise ValueError("decode_step: a row's window is full; call slide_windows first")
    pos = cache.lengths.clamp(max=cache.capacity - 1)  # placeholder rows may sit at capacity
    rows = torch.arange(b, device=device)
    stack = model.gpt2_model
    x = stack.drop(stack.wte(next_tokens) + stack.wpe(pos)).unsqueeze(1)  # (b, 1, d)
    new_lengths = pos + 1
    visible = torch.arange(cache.capacity, device=device)[None, :] < new_lengths[:, None]
    allowed = visible[:, None, None, :]
    for i, block in enumerate(stack.blocks):
        q, k, v = block.attn.qkv(block.ln_1(x))
        cache.keys[i][rows[advance], :, pos[advance]] = k[advance, :, 0]
        cache.values[i][rows[advance], :, pos[advance]] = v[advance, :, 0]
        x = x + block.attn.attend(q, cache.keys[i], cache.values[i], allowed)
        x = x + block.mlp(block.ln_2(x))
    h = stack.ln_f(x)
    wq, wk = model.sense_weight_net.query_key(h)
    cache.weight_keys[rows[advance], :, pos[advance]] = wk[advance, :, 0]
    alpha = _alpha_row(model, wq, cache.weight_keys, new_lengths)
    cache.tokens[rows[advance], pos[advance]] = next_tokens[advance]
    cache.lengths = torch.where(advance, new_lengths, cache.lengths)
    cache.last_alpha = torch.where(advance[:, None, None], alpha, cache.last_alpha)
    return cache.last_alpha


@torch.no_grad()
def slide_windows(model: BackpackLM, cache: BackpackCache, rows_needing_room: torch.Tensor, keep: int) -> int:
    """Re-prefill every full row among `rows_needing_room` with its most recent `keep` tokens. Returns the count."""
    full = rows_needing_room & (cache.lengths >= cache.capacity)
    idx = full.nonzero().flatten()
    if idx.numel() == 0:
        return 0
    windows = [cache.window_tokens(int(r))[-keep:] for r in idx]
    cache.overwrite_rows(idx, prefill(model, windows))
    return int(idx.numel())


def backpack_logits(
    model: BackpackLM, cache: BackpackCache, alpha: torch.Tensor, sense_edits: SenseEdits | None = None
) -> torch.Tensor:
    """Full Backpack next-token logits from an α row: runs the sense network (checks and demos only;
    serving never needs it)."""
    senses = model.sense_vectors(cache.tokens)  # (b, k, cap, d)
    if sense_edits is not None:
        senses = add_sense_edits(senses, cache.tokens, sense_edits)
    cap = cache.capacity
    visible = (torch.arange(cap, device=alpha.device)[None, :] < cache.lengths[:, None]).to(alpha.dtype)
    hidden = torch.einsum("bkj,bkjd->bd", alpha * visible[:, None, :], senses)
    return hidden @ model.embedding.T
