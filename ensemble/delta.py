"""The Backpack side of the ensemble: β·E·δ_t from the cached α (DESIGN §1).

    δ_t = Σ_{j≤t} Σ_{ℓ: (x_j,ℓ)∈S} α[ℓ,t,j] · Δ(x_j,ℓ)        (Δ already β-scaled)

Only α, E and the pack's Δ are needed: the sense network never runs here, and
a sequence none of whose tokens carries an edited sense never touches the
Backpack at all (exact skip).

With a sense head (ensemble.sense_head) α comes from the large model's final hidden states,
which the caller hands over as the large model produces them (`add_hidden`); a sequence keeps
those of its current window until its first edited token, then only the ones not yet fed.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .backpack import BackpackLM
from .edits import SenseEdits
from .incremental import BackpackCache, decode_step, prefill, slide_windows, window_for
from .sense_head import SenseHeadLM, head_decode_step, head_prefill, head_slide_windows


class EditTable:
    """A (combined, β-scaled) edit set laid out for lookup, sparse: its edited tokens (sorted), for each token a
    slot per sense pointing into the Δ rows, and the Δ rows after a zero row (slot 0: sense not edited). Memory
    grows with the edited (token, sense) pairs, not with the vocabulary or tokens × senses."""

    def __init__(self, edits: SenseEdits, num_senses: int):
        tokens, row_of = torch.unique(edits.token_ids, return_inverse=True)
        self.tokens = tokens
        self.slots = torch.zeros(len(tokens), num_senses, dtype=torch.long)
        self.slots[row_of, edits.sense_ids] = torch.arange(1, len(edits) + 1)
        self.deltas = torch.cat([edits.deltas.new_zeros(1, edits.d), edits.deltas])
        self.edited_tokens = frozenset(tokens.tolist())

    def touches(self, token_ids: Iterable[int]) -> bool:
        return any(t in self.edited_tokens for t in token_ids)

    def rows_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Row of each token in `tokens` (same shape), -1 where the token is not edited."""
        return _find(self.tokens.to(token_ids.device), token_ids)


def _find(sorted_keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Index of each query in the sorted 1-d `sorted_keys`, -1 where absent."""
    if sorted_keys.numel() == 0:
        return torch.full_like(queries, -1)
    pos = torch.searchsorted(sorted_keys, queries).clamp(max=sorted_keys.numel() - 1)
    return torch.where(sorted_keys[pos] == queries, pos, -1)


def logit_delta(delta: torch.Tensor, embedding: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """E·δ over the shared vocabulary U = [0, vocab_size): (..., d) -> (..., vocab_size).

    log p_ft − log p_pre = E·δ − c·1, and c cancels in the softmax: this is the logit change a pack
    (already β-scaled, or times β here) makes. Rows of E past U are padding and never part of it.
    """
    return delta @ embedding[:vocab_size].T


def sequence_deltas(alpha: torch.Tensor, input_ids: torch.Tensor, edits: SenseEdits) -> torch.Tensor:
    """δ_t for every position of full sequences, from a full α (b, k, s, s): (b, s, d).

    Only the edited source positions are gathered, so the cost grows with their
    count, not with s·k·d per position.
    """
    b, k, s, _ = alpha.shape
    d = edits.d
    if len(edits) == 0:
        return torch.zeros(b, s, d, dtype=alpha.dtype, device=alpha.device)
    table = EditTable(edits.to("cpu"), k)
    rows = table.rows_of(input_ids)  # (b, s), -1 where not edited
    n_edit = (rows >= 0).sum(-1)
    p = int(n_edit.max()) if b else 0
    if p == 0:
        return torch.zeros(b, s, d, dtype=alpha.dtype, device=alpha.device)
    # Edited source positions first in each row (stable), then take p of them.
    order = torch.argsort((rows < 0).to(torch.int8), dim=-1, stable=True)[:, :p]  # (b, p)
    valid = torch.gather(rows, 1, order) >= 0  # (b, p)
    slots = table.slots.to(alpha.device)[torch.gather(rows, 1, order).clamp(min=0)] * valid[..., None]  # (b, p, k)
    blocks = table.deltas.to(device=alpha.device, dtype=alpha.dtype)[slots]  # (b, p, k, d); slot 0 is a zero row
    alpha_src = torch.gather(alpha, 3, order[:, None, None, :].expand(b, k, s, p))  # (b, k, s, p)
    return torch.einsum("bktp,bpkd->btd", alpha_src, blocks)


@dataclass
class DeltaStats:
    backpack_calls: int = 0  # prefill or decode_step invocations
    exact_skip_rows: int = 0  # rows served with δ = 0 and no Backpack work
    window_reprefills: int = 0  # rows whose window slid past n_positions
    backpack_seconds: float = 0.0
    resumes: int = 0  # suspended sequences that rejoined the batch without a prefill


@dataclass
class _Seq:
    tokens: list[int]
    table_key: Hashable
    touched: bool  # some token carries an edited sense
    consumed: int = 0  # tokens the Backpack has processed (window slides included)
    active: bool = False  # has a row in the cache
    saved: BackpackCache | None = None  # suspended: its cache row, kept out of the batch (resumes without prefill)
    # Sense head only: the large model's hidden states of tokens [hidden_from, hidden_end), as chunks.
    hidden: list[torch.Tensor] = field(default_factory=list)
    hidden_from: int = 0
    hidden_end: int = 0


@dataclass
class DeltaTracker:
    """Per-sequence incremental Backpack state with exact skip, batched over sequences."""

    backpack: BackpackLM | SenseHeadLM
    window_keep: int | None = None
    stats: DeltaStats = field(default_factory=DeltaStats)
    vocab_size: int = field(kw_only=True)  # |U| (Ensemble.vocab.size): deltas cover ids [0, vocab_size)

    def __post_init__(self) -> None:
        cfg = self.backpack.config
        if not 0 < self.vocab_size <= cfg.vocab_size:
            raise ValueError(
                f"vocab_size: the Backpack has {cfg.vocab_size} rows, fewer than the tokenizer's {self.vocab_size} ids"
            )
        self.keep = self.window_keep or (3 * cfg.n_positions) // 4
        if not 0 < self.keep < cfg.n_positions:
            raise ValueError(f"window_keep must be in (0, {cfg.n_positions}), got {self.keep}")
        self.device = self.backpack.embedding.device
        self.dtype = self.backpack.embedding.dtype
        # One of the two: a Backpack runs its own stack; a sense head reads the large model's hidden states.
        self.stack = self.backpack if isinstance(self.backpack, BackpackLM) else None
        self.head = self.backpack if isinstance(self.backpack, SenseHeadLM) else None
        self._seqs: dict[Hashable, _Seq] = {}
        self._tables: dict[Hashable, EditTable] = {}
        self._slots: list[Hashable] = []  # cache row -> seq id
        self._slot_tables: torch.Tensor | None = None  # cache row -> index of its table in _lookup
        self._cache: BackpackCache | None = None
        self._lookup: tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[Hashable, int]] | None = None

    # ------------------------------------------------------------------ membership

    def add(self, seq_id: Hashable, prompt_ids: list[int], edits: SenseEdits, key: Hashable | None = None) -> None:
        """Register a sequence with its (β-scaled, combined) edits; `key` shares tables between sequences."""
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} is already tracked")
        if not prompt_ids:
            raise ValueError("prompt_ids: empty")
        key = key if key is not None else ("edits", id(edits))
        if key not in self._tables:
            cfg = self.backpack.config
            edits.validate(cfg.vocab_size, cfg.num_senses, cfg.n_embd)
            self._tables[key] = EditTable(edits.to("cpu", self.dtype), cfg.num_senses)
            self._lookup = self._slot_tables = None
        table = self._tables[key]
        self._seqs[seq_id] = _Seq(list(prompt_ids), key, table.touches(prompt_ids))

    @property
    def uses_hidden(self) -> bool:
        """Whether α needs the large model's hidden states (`add_hidden`): the sense model is a sense head."""
        return self.head is not None

    def add_hidden(self, seq_id: Hashable, hidden: torch.Tensor) -> None:
        """The large model's final hidden states (n, d) of the sequence's next n tokens (sense head only).
        Sequences whose packs edit nothing never need them and keep none."""
        seq = self._seqs[seq_id]
        n = int(hidden.shape[0])
        if self.head is not None and self._tables[seq.table_key].edited_tokens:
            seq.hidden.append(hidden.detach().to(self.device, self.dtype))
            seq.hidden_end += n
            lo = seq.consumed if seq.active else seq.hidden_end - self.backpack.config.n_positions
            if lo - seq.hidden_from >= self.backpack.config.n_positions:  # amortised: trim once a window is stale
                self._hidden_rows(seq, lo, seq.hidden_end, keep=True)
        else:
            seq.hidden_from = seq.hidden_end = seq.hidden_end + n

    def _hidden_rows(self, seq: _Seq, start: int, stop: int, keep: bool = False) -> torch.Tensor:
        """Hidden states of tokens [start, stop); `keep`: also drop the stored rows before `start`."""
        if start < seq.hidden_from or stop > seq.hidden_end:
            raise ValueError(
                f"sense head: hidden states of tokens [{start}, {stop}) are needed, "
                f"[{seq.hidden_from}, {seq.hidden_end}) were given (add_hidden)"
            )
        whole = torch.cat(seq.hidden) if len(seq.hidden) != 1 else seq.hidden[0]
        if keep:
            seq.hidden, seq.hidden_from = [whole[start - seq.hidden_from :]], start
            return seq.hidden[0][: stop - start]
        return whole[start - seq.hidden_from : stop - seq.hidden_from]

    def append(self, seq_id: Hashable, token_id: int) -> None:
        seq = self._seqs[seq_id]
        seq.tokens.append(int(token_id))
        if not seq.touched and int(token_id) in self._tables[seq.table_key].edited_tokens:
            seq.touched = True

    def remove(self, seq_id: Hashable) -> None:
        seq = self._seqs.pop(seq_id)
        if seq.active:
            self._drop_slot(seq_id)
        if not any(s.table_key == seq.table_key for s in self._seqs.values()):
            del self._tables[seq.table_key]
            self._lookup = self._slot_tables = None

    def _drop_slot(self, seq_id: Hashable) -> None:
        keep = [i for i, s in enumerate(self._slots) if s != seq_id]
        self._slots = [self._slots[i] for i in keep]
        self._slot_tables = None
        cache = self._active_cache()
        self._cache = cache.select(torch.tensor(keep, dtype=torch.long, device=self.device)) if keep else None

    def suspend(self, seq_id: Hashable) -> None:
        """Take the sequence's cache row out of the batch (no Backpack work while suspended) and keep it:
        when the sequence is next stepped it rejoins without a prefill (vLLM removes unscheduled requests
        from its batch and adds them back later)."""
        seq = self._seqs[seq_id]
        if not seq.active:
            return
        i = self._slots.index(seq_id)
        seq.saved = self._active_cache().select(torch.tensor([i], dtype=torch.long, device=self.device))
        seq.active = False
        self._drop_slot(seq_id)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def is_active(self, seq_id: Hashable) -> bool:
        return self._seqs[seq_id].active

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def logit_deltas(self, seq_ids: Sequence[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
        """E·δ_t over the shared vocabulary for the next token of each sequence.

        Returns (deltas (n, vocab_size), active (n,) bool); inactive rows are exact
        zeros and cost nothing on the Backpack side.
        """
        seqs = [self._seqs[s] for s in seq_ids]
        active = torch.tensor([s.touched for s in seqs], dtype=torch.bool)
        self.stats.exact_skip_rows += int((~active).sum())
        out = torch.zeros(len(seq_ids), self.vocab_size, dtype=self.dtype, device=self.device)
        if not bool(active.any()):
            return out, active.to(self.device)
        t0 = time.perf_counter()
        self._activate([s for s in seq_ids if self._seqs[s].touched and not self._seqs[s].active])
        self._catch_up()
        slot_of = {sid: i for i, sid in enumerate(self._slots)}
        wanted = [s for s, a in zip(seq_ids, active.tolist(), strict=True) if a]
        slots = torch.tensor([slot_of[s] for s in wanted], dtype=torch.long, device=self.device)
        delta = self._deltas_for(slots)  # (n_active, d)
        out[active.to(self.device)] = logit_delta(delta, self.backpack.embedding, self.vocab_size)
        self.stats.backpack_seconds += time.perf_counter() - t0
        return out, active.to(self.device)

    def _activate(self, seq_ids: list[Hashable]) -> None:
        """First edited token seen: prefill the sequence's window once and give it a cache row (a suspended
        sequence gets its saved row back instead; `_catch_up` feeds it the tokens appended meanwhile)."""
        saved = [s for s in seq_ids if self._seqs[s].saved is not None]
        if saved:
            rows = [row for s in saved if (row := self._seqs[s].saved) is not None]
            self._cache = BackpackCache.concat(rows if self._cache is None else [self._cache, *rows])
            for s in saved:
                seq = self._seqs[s]
                seq.active, seq.saved = True, None
                self._slots.append(s)
            self._slot_tables = None
            self.stats.resumes += len(saved)
            seq_ids = [s for s in seq_ids if s not in set(saved)]
        if not seq_ids:
            return
        n_pos = self.backpack.config.n_positions
        if self.stack is not None:
            windows = [window_for(self._seqs[s].tokens, n_pos, self.keep) for s in seq_ids]
            fresh = prefill(self.stack, windows)
            ends = [len(self._seqs[s].tokens) for s in seq_ids]
        else:  # the tokens whose hidden states are in: the engine feeds the large model first
            ends = [self._seqs[s].hidden_end for s in seq_ids]
            windows = [
                window_for(self._seqs[s].tokens[:end], n_pos, self.keep) for s, end in zip(seq_ids, ends, strict=True)
            ]
            hidden = [
                self._hidden_rows(self._seqs[s], end - len(w), end)
                for s, w, end in zip(seq_ids, windows, ends, strict=True)
            ]
            assert self.head is not None
            fresh = head_prefill(self.head, windows, hidden)
        self.stats.backpack_calls += 1
        self._cache = fresh if self._cache is None else BackpackCache.concat([self._cache, fresh])
        for s, end in zip(seq_ids, ends, strict=True):
            seq = self._seqs[s]
            seq.active, seq.consumed = True, end
            self._slots.append(s)
        self._slot_tables = None

    def _active_cache(self) -> BackpackCache:
        """The cache of the active rows; only called when some sequence is active."""
        if self._cache is None:
            raise RuntimeError("DeltaTracker: no active sequence has a Backpack cache row")
        return self._cache

    def _catch_up(self) -> None:
        """Feed every active row the tokens appended since its last step (one decode step each)."""
        while self._slots:
            pending = [self._seqs[s] for s in self._slots]
            need = torch.tensor([len(s.tokens) > s.consumed for s in pending], dtype=torch.bool, device=self.device)
            if not bool(need.any()):
                return
            cache = self._active_cache()
            nxt = torch.tensor(
                [s.tokens[s.consumed] if len(s.tokens) > s.consumed else 0 for s in pending],
                dtype=torch.long,
                device=self.device,
            )
            if self.stack is not None:
                self.stats.window_reprefills += slide_windows(self.stack, cache, need, self.keep)
                decode_step(self.stack, cache, nxt, advance=need)
            else:
                assert self.head is not None
                self.stats.window_reprefills += head_slide_windows(cache, need, self.keep)
                hidden = torch.stack(
                    [
                        self._hidden_rows(s, s.consumed, s.consumed + 1, keep=True)[0]
                        if n
                        else torch.zeros(self.backpack.config.n_embd, dtype=self.dtype, device=self.device)
                        for s, n in zip(pending, need.tolist(), strict=True)
                    ]
                )
                head_decode_step(self.head, cache, nxt, hidden, advance=need)
            self.stats.backpack_calls += 1
            for s, n in zip(pending, need.tolist(), strict=True):
                s.consumed += int(n)

    def _deltas_for(self, slots: torch.Tensor) -> torch.Tensor:
        """δ (n, d) for cache rows `slots`, gathering only the edited window positions.

        Rows may carry different edit sets: each looks its window's tokens up in its own table through one
        sorted key (table, token) over every table, so a batch mixing pack sets is one gather, not a loop."""
        keys, sense_slots, deltas, index_of = self._lookup_tables()
        cache = self._active_cache()
        if self._slot_tables is None:  # membership changed since the last step
            self._slot_tables = torch.tensor(
                [index_of[self._seqs[s].table_key] for s in self._slots], dtype=torch.long, device=self.device
            )
        table_idx = self._slot_tables[slots]
        tokens = cache.tokens[slots]  # (n, cap)
        rows = _find(keys, table_idx[:, None] * self.backpack.config.vocab_size + tokens)  # (n, cap): key or -1
        cap = cache.capacity
        rows = torch.where(torch.arange(cap, device=self.device)[None, :] < cache.lengths[slots, None], rows, -1)
        bi, ji = (rows >= 0).nonzero(as_tuple=True)
        delta = torch.zeros(len(slots), self.backpack.config.n_embd, dtype=self.dtype, device=self.device)
        if bi.numel():
            alpha = cache.last_alpha[slots]  # (n, k, cap)
            contrib = torch.einsum("nk,nkd->nd", alpha[bi, :, ji], deltas[sense_slots[rows[bi, ji]]])
            delta.index_add_(0, bi, contrib)
        return delta

    def _lookup_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[Hashable, int]]:
        """Every live table merged: sorted keys table·|V| + token, each key's sense slots into the merged Δ rows
        (a zero row first), and key -> table index. Rebuilt when a table comes or goes; its size is the edited
        pairs of the live tables, whatever the vocabulary."""
        if self._lookup is None:
            vocab = self.backpack.config.vocab_size
            keys, slots, deltas, offset = [], [], [torch.zeros(1, self.backpack.config.n_embd, dtype=self.dtype)], 0
            index_of: dict[Hashable, int] = {}
            for i, (k, t) in enumerate(self._tables.items()):
                index_of[k] = i
                keys.append(t.tokens + i * vocab)
                slots.append(torch.where(t.slots > 0, t.slots + offset, 0))
                deltas.append(t.deltas[1:])
                offset += t.deltas.shape[0] - 1
            n_senses = self.backpack.config.num_senses
            self._lookup = (
                torch.cat(keys).to(self.device) if keys else torch.zeros(0, dtype=torch.long, device=self.device),
                torch.cat(slots).to(self.device)
                if slots
                else torch.zeros(0, n_senses, dtype=torch.long, device=self.device),
                torch.cat(deltas).to(self.device, self.dtype),
                index_of,
            )
        return self._lookup
