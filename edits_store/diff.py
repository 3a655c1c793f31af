"""Which (token, sense) pairs two pack versions change, and by how much (``sensepack packs diff``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import IncompatiblePackError
from .format import PackContents


@dataclass(frozen=True)
class PairChange:
    """One (token, sense) pair that differs. A pair absent from one side has norm 0 there."""

    token: int
    sense: int
    norm_a: float
    norm_b: float
    diff_norm: float  # ||Δ_b - Δ_a||_2
    max_abs_diff: float


@dataclass
class PackDiff:
    a: str
    b: str
    added: list[PairChange] = field(default_factory=list)  # in b only
    removed: list[PairChange] = field(default_factory=list)  # in a only
    changed: list[PairChange] = field(default_factory=list)  # in both, ||Δ_b - Δ_a|| > atol
    unchanged: int = 0

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        def cut(items: list[PairChange]) -> list[dict[str, Any]]:
            return [asdict(c) for c in (items if top is None else items[:top])]

        return {
            "a": self.a,
            "b": self.b,
            "identical": self.identical,
            "counts": {
                "added": len(self.added),
                "removed": len(self.removed),
                "changed": len(self.changed),
                "unchanged": self.unchanged,
            },
            "added": cut(self.added),
            "removed": cut(self.removed),
            "changed": cut(self.changed),
        }


def _changes(tokens: torch.Tensor, senses: torch.Tensor, da: torch.Tensor, db: torch.Tensor) -> list[PairChange]:
    diff = db - da
    diff_norm = diff.norm(dim=1)
    max_abs = diff.abs().amax(dim=1) if diff.shape[1] else torch.zeros(len(diff))
    norm_a, norm_b = da.norm(dim=1), db.norm(dim=1)
    order = torch.argsort(diff_norm, descending=True, stable=True)
    return [
        PairChange(
            int(tokens[i]), int(senses[i]), float(norm_a[i]), float(norm_b[i]), float(diff_norm[i]), float(max_abs[i])
        )
        for i in order.tolist()
    ]


def diff_packs(a: PackContents, b: PackContents, atol: float = 0.0) -> PackDiff:
    """Compare two packs pair by pair; ``changed`` lists pairs whose delta moved by more than ``atol`` (L2).

    Lists are sorted by the size of the change, largest first.
    """
    if a.manifest.d_model != b.manifest.d_model:
        raise IncompatiblePackError(
            f"cannot diff packs of width {a.manifest.d_model} and {b.manifest.d_model}",
            pack=f"{a.ref} vs {b.ref}",
            check="d_model",
        )
    stride = max(a.manifest.num_senses, b.manifest.num_senses)
    ka = a.token_ids * stride + a.sense_ids
    kb = b.token_ids * stride + b.sense_ids
    a_in_b = torch.isin(ka, kb)
    b_in_a = torch.isin(kb, ka)
    d = a.manifest.d_model
    out = PackDiff(a=a.ref, b=b.ref)

    rem = (~a_in_b).nonzero().flatten()
    out.removed = _changes(a.token_ids[rem], a.sense_ids[rem], a.deltas[rem], torch.zeros(len(rem), d))
    add = (~b_in_a).nonzero().flatten()
    out.added = _changes(b.token_ids[add], b.sense_ids[add], torch.zeros(len(add), d), b.deltas[add])

    ia = a_in_b.nonzero().flatten()
    ib = b_in_a.nonzero().flatten()
    ia = ia[torch.argsort(ka[ia])]
    ib = ib[torch.argsort(kb[ib])]
    moved = (b.deltas[ib] - a.deltas[ia]).norm(dim=1) > atol
    idx = moved.nonzero().flatten()
    out.changed = _changes(a.token_ids[ia][idx], a.sense_ids[ia][idx], a.deltas[ia][idx], b.deltas[ib][idx])
    out.unchanged = int((~moved).sum())
    return out
