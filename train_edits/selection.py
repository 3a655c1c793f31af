"""Sense selection (the paper's Eq. 9, "alpha" method).

For an example, the α mass that the suffix-predicting positions put on each
(source token type w, sense ℓ) is

    A_x(w, ℓ) = Σ_{t ∈ suffix-predicting rows} Σ_{j: x_j = w} α[ℓ, t, j]

(``balance``: A_x1 + A_x2; ``good-v-bad``: A_x1 − A_x2). The background
table is the same mass over R chunks (every position that predicts a next
token), averaged per chunk. The score is

    score(w, ℓ) = A_x(w, ℓ) − λ · A_R(w, ℓ)

and the top k (w, ℓ) **among the pairs with combined mass A_x(w, ℓ) > 0** are
kept; the union over examples is trained. As upstream
(``importance.py:102-103``: ``torch.where(grads>0, normalized_grads, min-1)``),
a pair whose combined mass is ≤ 0 is never preferred to one with positive
mass, however large the latter's background: for ``good-v-bad`` that drops
the pairs that pull more towards the bad suffix than the good one. Upstream
fills the top k with arbitrary ties at ``min − 1`` when fewer than k pairs
have positive mass; we keep fewer than k instead (those ties carry no
information). Pairs only visible through the final token of a sequence have
zero mass (it is only predicted, never attended), so they are never kept.
Ties break towards the smaller (token, sense).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .compute import chunk_batches
from .encoding import EncodedExample, Scored, pad_batch
from .tasks import LossType


@torch.no_grad()
def example_table(model, seqs: Sequence[Scored], loss_type: LossType) -> dict[tuple[int, int], float]:
    """Sparse α-mass table {(token, sense): mass} of one example (combined per loss type)."""
    lt = LossType(loss_type)
    ids, _, mask = pad_batch(list(seqs))
    dev = model.embedding.device
    alpha = model.contextualize(ids.to(dev)).float().cpu()  # (b, k, s, s)
    k = alpha.shape[1]
    table: dict[tuple[int, int], float] = {}
    for i, s in enumerate(seqs):
        sign = -1.0 if (lt is LossType.GOOD_V_BAD and i == 1) else 1.0
        L = len(s.ids)
        mass = (alpha[i, :, :L, :L] * mask[i, :L].view(1, L, 1)).sum(1)  # (k, L): per source position
        # sources visible to a scored row: every token but the last one (which is only predicted)
        for j, tok in enumerate(s.ids[: s.start + s.n - 1]):
            for ell in range(k):
                key = (tok, ell)
                table[key] = table.get(key, 0.0) + sign * float(mass[ell, j])
    return table


@torch.no_grad()
def background_table(
    model, chunks: Sequence[torch.Tensor], batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """(vocab, senses) α mass over R, averaged per chunk (all next-token-predicting rows)."""
    vocab = model.embedding.shape[0]
    k = model.config.num_senses
    table = torch.zeros(vocab, k, dtype=torch.float64)
    it = chunk_batches(chunks, batch_size)
    if progress:
        it = tqdm(it, total=(len(chunks) + batch_size - 1) // batch_size, desc="background α", leave=False)
    for _, ids, mask in it:
        dev = model.embedding.device
        alpha = model.contextualize(ids.to(dev))  # (b, k, s, s)
        mass = (alpha * mask.to(dev)[:, None, :, None]).sum(2).float().cpu()  # (b, k, s) per source position
        src = mass.permute(0, 2, 1).reshape(-1, k).double()  # (b*s, k)
        # pads sit after the last scored row: their source mass is 0 unless attended, and
        # they are never attended by real rows (causal, right padded)
        table.index_add_(0, ids.reshape(-1), src)
    return table / max(len(chunks), 1)


@dataclass
class Selection:
    pairs: list[tuple[int, int]]
    per_example: list[list[dict]] = field(default_factory=list)

    def to_json(self, tokenizer=None) -> dict:
        def dec(t):
            return tokenizer.decode([t]) if tokenizer is not None else None

        return {
            "pairs": [[t, s] for t, s in self.pairs],
            "tokens": [dec(t) for t, _ in self.pairs] if tokenizer is not None else None,
            "per_example": self.per_example,
        }


def rank_pairs(
    table: dict[tuple[int, int], float], background: torch.Tensor, lam: float, k: int
) -> list[tuple[float, int, int]]:
    """The top k (score, token, sense) of one example's mass table, among pairs with mass > 0 (upstream)."""
    scored = sorted(
        ((m - lam * float(background[t, s]), t, s) for (t, s), m in table.items() if m > 0),
        key=lambda x: (-x[0], x[1], x[2]),
    )
    return scored[:k]


def select_senses(
    model,
    examples: Sequence[EncodedExample],
    background: torch.Tensor,
    loss_type: LossType,
    k: int,
    lam: float,
    progress: bool = False,
) -> Selection:
    """Top-k (token, sense) per example among pairs with positive mass in it; union over examples."""
    chosen: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    per_ex: list[list[dict]] = []
    it = tqdm(examples, desc="select senses", leave=False) if progress else examples
    for ex in it:
        table = example_table(model, ex.seqs, loss_type)
        top = rank_pairs(table, background, lam, k)
        per_ex.append([{"token": t, "sense": s, "score": sc} for sc, t, s in top])
        for _, t, s in top:
            if (t, s) not in seen:
                seen.add((t, s))
                chosen.append((t, s))
    return Selection(chosen, per_ex)
