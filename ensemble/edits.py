"""Sparse sense edits: the (token, sense) -> Δ table an edit pack carries.

The core never reads pack files (edits_store does); it sees `SenseEdits`
tensors and a β per pack (`PackRef`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class SenseEdits:
    """Δ(w, ℓ) for a sparse set of (token w, sense ℓ) pairs."""

    token_ids: torch.Tensor  # int64 [n]
    sense_ids: torch.Tensor  # int64 [n]
    deltas: torch.Tensor  # float [n, d]

    @staticmethod
    def empty(d: int, dtype: torch.dtype = torch.float32) -> SenseEdits:
        return SenseEdits(
            torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, d, dtype=dtype)
        )

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    @property
    def nbytes(self) -> int:
        """Memory its tensors hold."""
        return int(self.token_ids.nbytes + self.sense_ids.nbytes + self.deltas.nbytes)

    @property
    def d(self) -> int:
        return int(self.deltas.shape[-1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SenseEdits:
        return SenseEdits(
            self.token_ids.to(device),
            self.sense_ids.to(device),
            self.deltas.to(device=device, dtype=dtype or self.deltas.dtype),
        )

    def validate(self, vocab_size: int, num_senses: int, d: int) -> None:
        """Raise ValueError naming the first check that fails."""
        n = self.token_ids.shape[0]
        if self.token_ids.dim() != 1 or self.sense_ids.shape != (n,) or self.deltas.shape != (n, d):
            raise ValueError(
                f"sense edits: shapes token_ids {tuple(self.token_ids.shape)}, sense_ids "
                f"{tuple(self.sense_ids.shape)}, deltas {tuple(self.deltas.shape)}; expected [n], [n], [n, {d}]"
            )
        if n and (int(self.token_ids.min()) < 0 or int(self.token_ids.max()) >= vocab_size):
            raise ValueError(f"sense edits: token_ids outside [0, {vocab_size})")
        if n and (int(self.sense_ids.min()) < 0 or int(self.sense_ids.max()) >= num_senses):
            raise ValueError(f"sense edits: sense_ids outside [0, {num_senses})")
        if not torch.isfinite(self.deltas).all():
            raise ValueError("sense edits: deltas contain NaN or Inf")

    @staticmethod
    def combine(weighted: list[tuple[SenseEdits, float]], d: int | None = None) -> SenseEdits:
        """Σ_p β_p Δ_p with duplicate (token, sense) pairs summed: packs' deltas add (DESIGN §4)."""
        weighted = [(e, b) for e, b in weighted if len(e) and b != 0.0]
        if not weighted:
            if d is None:
                raise ValueError("combine: no edits and no dimension given")
            return SenseEdits.empty(d)
        tok = torch.cat([e.token_ids for e, _ in weighted])
        sen = torch.cat([e.sense_ids for e, _ in weighted])
        del_ = torch.cat([e.deltas.float() * b for e, b in weighted])
        keys = tok * (int(sen.max()) + 1) + sen
        uniq, inverse = torch.unique(keys, return_inverse=True)
        out = torch.zeros(len(uniq), del_.shape[1], dtype=del_.dtype)
        out.index_add_(0, inverse, del_)
        first = torch.full((len(uniq),), len(keys), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(len(keys)), reduce="amin"
        )
        return SenseEdits(tok[first], sen[first], out)


@dataclass(frozen=True)
class PackRef:
    """One pack as a request uses it: pinned version, its edits and the β to apply."""

    name: str
    version: str
    edits: SenseEdits
    beta: float

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.name, self.version, float(self.beta))


def combine_packs(packs: list[PackRef], d: int) -> SenseEdits:
    return SenseEdits.combine([(p.edits, p.beta) for p in packs], d=d)


PackKey = tuple[tuple[str, str, float], ...]


def pack_key(packs: list[PackRef]) -> PackKey:
    """Sequences with the same pinned packs and βs share one combined edit set."""
    return tuple(sorted(p.key for p in packs))


class CombinedEditsCache:
    """Σ_p β_p Δ_p per pack set, shared by the requests naming the same packs and βs, least recently used out
    past `budget_bytes` (the set just built always stays): thousands of pack mixes cost a bounded memory."""

    def __init__(self, d: int, budget_bytes: int = 256 << 20):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
        self.d = d
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self.evictions = 0
        self._sets: OrderedDict[PackKey, SenseEdits] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sets)

    def get(self, key: PackKey, packs: Callable[[], list[PackRef]]) -> SenseEdits:
        """The combined set of `key`; `packs()` gives its packs when it has to be built."""
        with self._lock:
            hit = self._sets.get(key)
            if hit is not None:
                self._sets.move_to_end(key)
                return hit
        edits = combine_packs(packs(), self.d)
        with self._lock:
            if key not in self._sets:
                self._sets[key] = edits
                self.nbytes += edits.nbytes
            while self.nbytes > self.budget_bytes and len(self._sets) > 1:
                _, old = self._sets.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1
            return self._sets[key]
