"""Backpack-side math for sense finetuning, with α cached per sequence.

α never depends on the senses, so for a fixed sequence the finetuned Backpack's
output at position t is

    o'_t = o_t + Σ_{j≤t} Σ_ℓ α[ℓ,t,j] · Δ(x_j, ℓ)          logits'_t = E o'_t

We run the Backpack once per sequence (no grad), keep α only at the scored
rows and the base hidden state o_t there, and compute the edited logits from
the sparse trainable deltas. The dense (vocab × senses × d) table is never
built: per sequence we gather the deltas of the (x_j, ℓ) pairs that occur.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ensemble.backpack import add_sense_edits

from .encoding import PAD_ID, Scored, pad_batch


class EditIndex:
    """The selected (token, sense) pairs: row r of the delta table is pairs[r]."""

    def __init__(self, pairs: Sequence[tuple[int, int]], num_senses: int):
        self.pairs = [(int(t), int(s)) for t, s in pairs]
        if len(set(self.pairs)) != len(self.pairs):
            raise ValueError("duplicate (token, sense) pairs")
        self.num_senses = num_senses
        self.row = {p: i for i, p in enumerate(self.pairs)}
        self.tokens = {t for t, _ in self.pairs}
        self.token_ids = torch.tensor([t for t, _ in self.pairs], dtype=torch.long)
        self.sense_ids = torch.tensor([s for _, s in self.pairs], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.pairs)

    def index_map(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cols, idx): source positions carrying an edited sense, and (c, k) row indices (n = no edit)."""
        n = len(self.pairs)
        cols, rows = [], []
        for j, tok in enumerate(ids):
            if tok in self.tokens:
                cols.append(j)
                rows.append([self.row.get((tok, ell), n) for ell in range(self.num_senses)])
        if not cols:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, self.num_senses, dtype=torch.long)
        return torch.tensor(cols, dtype=torch.long), torch.tensor(rows, dtype=torch.long)

    def first_edited(self, ids: Sequence[int]) -> int | None:
        for j, tok in enumerate(ids):
            if tok in self.tokens:
                return j
        return None

    def edits(self, deltas: torch.Tensor):
        from ensemble.edits import SenseEdits

        return SenseEdits(self.token_ids.clone(), self.sense_ids.clone(), deltas.detach().float().clone())


def gather_deltas(deltas: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(n, d) trainable deltas, (c, k) row indices (n = none) -> (c, k, d), differentiable."""
    padded = torch.cat([deltas, deltas.new_zeros(1, deltas.shape[1])], dim=0)
    return padded[idx]


@dataclass
class CachedSeq:
    """A scored sequence with α and the base hidden state cached at its scored rows."""

    scored: Scored
    targets: torch.Tensor  # (P,)
    alpha: torch.Tensor  # (k, P, c) α at scored rows and edited source columns
    hidden: torch.Tensor  # (P, d) base o_t at scored rows
    idx: torch.Tensor  # (c, k) delta rows of the edited source columns

    def edited_hidden(self, deltas: torch.Tensor) -> torch.Tensor:
        if self.idx.numel() == 0:
            return self.hidden
        d = gather_deltas(deltas, self.idx)  # (c, k, d)
        return self.hidden + torch.einsum("kpc,ckd->pd", self.alpha, d)

    def nll_sum(self, embedding: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.edited_hidden(deltas), embedding)
        return F.cross_entropy(logits.float(), self.targets, reduction="sum")


@torch.no_grad()
def alpha_hidden(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α (b,k,s,s) and o = Σ_ℓ α_ℓ C_ℓ (b,s,d) as the core's forward computes them, without the LM head."""
    alpha = model.contextualize(ids)
    senses = model.sense_vectors(ids)
    return alpha, torch.matmul(alpha, senses).sum(dim=1)


@torch.no_grad()
def cache_sequences(model, seqs: Sequence[Scored], index: EditIndex, batch_size: int = 8) -> list[CachedSeq]:
    out: list[CachedSeq] = []
    dev = model.embedding.device
    for b0 in range(0, len(seqs), batch_size):
        chunk = list(seqs[b0 : b0 + batch_size])
        ids, _, _ = pad_batch(chunk)
        alpha, hidden = alpha_hidden(model, ids.to(dev))
        for i, s in enumerate(chunk):
            pos = torch.tensor(s.positions, dtype=torch.long, device=dev)
            cols, idx = index.index_map(s.ids)
            cols, idx = cols.to(dev), idx.to(dev)
            a = alpha[i][:, pos][:, :, cols] if len(cols) else alpha.new_zeros(alpha.shape[1], len(pos), 0)
            out.append(
                CachedSeq(
                    s,
                    torch.tensor(s.targets, dtype=torch.long, device=dev),
                    a.contiguous(),
                    hidden[i, pos].contiguous(),
                    idx,
                )
            )
    return out


def own_sequence_deltas(alpha: torch.Tensor, input_ids: torch.Tensor, edits) -> torch.Tensor:
    """δ_t = Σ_j Σ_ℓ α[ℓ,t,j] Δ(x_j,ℓ) for full sequences: (b,k,s,s), (b,s) -> (b,s,d)."""
    match = (input_ids.unsqueeze(-1) == edits.token_ids.to(input_ids.device)).to(alpha.dtype)  # (b, s, n)
    onehot = F.one_hot(edits.sense_ids.to(input_ids.device), alpha.shape[1]).to(alpha.dtype)  # (n, k)
    per_source = torch.einsum("bjn,nk,nd->bkjd", match, onehot, edits.deltas.to(alpha.dtype))
    return torch.einsum("bktj,bkjd->btd", alpha, per_source)


# ---------------------------------------------------------------------------
# Corpus chunks, the G loss (ball) and the KL regulariser


def chunk_batches(
    chunks: Sequence[torch.Tensor], batch_size: int
) -> Iterable[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield (chunk indices, right-padded ids, scored-position mask) batches.

    The mask marks positions 0..len-2 (each predicts the next token): the first
    token of each text is never scored.
    """
    for b0 in range(0, len(chunks), batch_size):
        idxs = list(range(b0, min(b0 + batch_size, len(chunks))))
        yield idxs, *_pad_chunks([chunks[i] for i in idxs])


def _pad_chunks(chs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(c) for c in chs)
    ids = torch.full((len(chs), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(chs), L), dtype=torch.float32)
    for i, c in enumerate(chs):
        ids[i, : len(c)] = c
        mask[i, : len(c) - 1] = 1.0
    return ids, mask


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row summed NLL of ids[:,1:] under logits[:,:-1], masked: -> (b,) float64."""
    tgt = ids[:, 1:]
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return (nll * mask[:, :-1]).sum(-1).double()


class GLoss:
    """The Backpack's mean per-token NLL on G, with edits, in exact-skip form.

    Chunks containing no edited token are unaffected by any delta: their NLL is
    the base NLL, computed once. Touched chunks are re-scored with the core's
    forward (``sense_edits=``) in the *same batches* as their base scores, so a
    zero delta gives a ratio of exactly 1 (paired comparison).
    """

    def __init__(self, model, chunks: Sequence[torch.Tensor], index: EditIndex, batch_size: int = 8):
        self.model = model
        self.chunks = list(chunks)
        self.index = index
        self.batch_size = batch_size
        self.count = int(sum(len(c) - 1 for c in self.chunks))
        tokset = (
            torch.tensor(sorted(index.tokens), dtype=torch.long) if len(index) else torch.zeros(0, dtype=torch.long)
        )
        self.touched = [i for i, c in enumerate(self.chunks) if len(tokset) and bool(torch.isin(c, tokset).any())]
        touched_set = set(self.touched)
        untouched = [c for i, c in enumerate(self.chunks) if i not in touched_set]
        self.untouched_sum = self._score(untouched, None)
        # α of the touched batches, kept: it never depends on the edits, and recomputing it every epoch costs a
        # contextualization (for a sense head, a pass of the large model)
        self._alpha: list[torch.Tensor] = []
        self.touched_base = self._score([self.chunks[i] for i in self.touched], None, keep_alpha=True)
        self.base_mean = (self.untouched_sum + self.touched_base) / self.count

    @torch.no_grad()
    def _score(self, chunks: list[torch.Tensor], edits, keep_alpha: bool = False) -> float:
        """Summed NLL; with kept α (`keep_alpha` on the first call over the touched chunks) the core's forward
        o = Σ α (C + Δ), logits = E o, reuses it."""
        total = 0.0
        dev = self.model.embedding.device
        if edits is not None:
            edits = edits.to(dev)
        reuse = not keep_alpha and edits is not None and len(self._alpha) > 0
        for b, (_, ids, mask) in enumerate(chunk_batches(chunks, self.batch_size)):
            ids, mask = ids.to(dev), mask.to(dev)
            if reuse:
                senses = add_sense_edits(self.model.sense_vectors(ids), ids, edits)
                hidden = torch.matmul(self._alpha[b], senses).sum(dim=1)
                logits = F.linear(hidden, self.model.embedding)
            else:
                out = self.model(ids, sense_edits=edits)
                logits = out.logits
                if keep_alpha:
                    self._alpha.append(out.alpha)
            total += float(next_token_nll(logits, ids, mask).sum())
        return total

    def mean(self, deltas: torch.Tensor | None) -> float:
        if deltas is None or not self.touched:
            return self.base_mean
        edits = self.index.edits(deltas)
        new = self._score([self.chunks[i] for i in self.touched], edits)
        return (self.untouched_sum + new) / self.count

    def ratio(self, deltas: torch.Tensor | None) -> float:
        return self.mean(deltas) / self.base_mean


class KLRegularizer:
    """KL(p_orig ‖ p_new) summed over the positions of one R chunk, the last one included.

    Upstream (``regularize.py:26-32``) takes the KL over every position of the input, the last one
    too (it predicts past the chunk's end, but its distribution still moves with δ); so do we.
    Positions before a chunk's first edited token have δ = 0, so p_new = p_orig there and their KL
    is exactly zero: only positions from the first edited token on are computed, and a chunk
    without edited tokens costs nothing. α and o_t for touched chunks are cached (bounded by `max_cache`).
    """

    def __init__(
        self,
        model,
        chunks: Sequence[torch.Tensor],
        index: EditIndex,
        max_cache: int | None = None,
        starts: Sequence[int] | None = None,
        exclude: Sequence[tuple[int, int]] | None = None,
    ):
        """`starts`: per chunk, the first position whose KL counts (default 0: every position); `exclude`: per chunk, a
        range [lo, hi) of positions whose KL does not count (an example's answer). `max_cache`: chunks
        whose α is kept (default: all of them; each holds only its rows from the first edited position, and a miss
        costs a full contextualization, which for a sense head is a pass of the large model)."""
        self.model = model
        self.chunks = list(chunks)
        self.index = index
        self.max_cache = len(chunks) if max_cache is None else max_cache
        self._cache: dict[int, CachedSeq] = {}
        self.first = [index.first_edited(c.tolist()) for c in self.chunks]
        if starts is not None:
            self.first = [None if f is None else max(f, s) for f, s in zip(self.first, starts, strict=True)]
        self.exclude = list(exclude) if exclude is not None else [(0, 0)] * len(self.chunks)

    @torch.no_grad()
    def _cached(self, i: int, f: int) -> CachedSeq:
        """α and o_t of chunk ``i`` from its first edited position ``f`` on (only chunks that have one)."""
        if i not in self._cache:
            if len(self._cache) >= self.max_cache:
                self._cache.pop(next(iter(self._cache)))
            ids = self.chunks[i].tolist()
            dev = self.model.embedding.device
            alpha, hidden = alpha_hidden(self.model, torch.tensor([ids], device=dev))
            lo, hi = self.exclude[i]
            pos = torch.tensor(  # rows f .. len-1 (every position with δ ≠ 0) outside [lo, hi)
                [p for p in range(f, len(ids)) if not lo <= p < hi], dtype=torch.long, device=dev
            )
            cols, idx = self.index.index_map(ids)
            cols, idx = cols.to(dev), idx.to(dev)
            a = alpha[0][:, pos][:, :, cols]
            # no targets: the KL needs only the distributions (the last row has no next token in the chunk)
            self._cache[i] = CachedSeq(
                Scored(tuple(ids), f + 1, len(ids) - 1 - f),
                torch.zeros(0, dtype=torch.long, device=dev),
                a.contiguous(),
                hidden[0, pos].contiguous(),
                idx,
            )
        return self._cache[i]

    def loss(self, i: int, embedding: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor | None:
        f = self.first[i]
        if f is None:
            return None
        cs = self._cached(i, f)
        with torch.no_grad():
            orig = torch.log_softmax(F.linear(cs.hidden, embedding).float(), dim=-1)
        new = torch.log_softmax(F.linear(cs.edited_hidden(deltas), embedding).float(), dim=-1)
        return F.kl_div(new, orig, log_target=True, reduction="sum")
