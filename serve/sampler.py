"""The batched sampler: one decode step's next tokens for every running row.

Given the step's log-probs ``lp`` (B, V) and each row's parameters, the rows
are sampled together on batched tensors (no Python loop over the vocabulary):

    x      = (lp - max_v lp) / T                 # shifted first: x <= 0, so no T overflows it
    x[v]   = -inf  where x[v] < k-th largest x   # top-k (k = 0: off)
    keep the smallest prefix of the sorted x whose probability mass reaches top_p
    token  = inverse CDF of softmax(x) at u ~ U[0, 1) drawn from the row's own generator

Greedy rows take ``argmax lp`` (EOS masked out while ``min_new_tokens`` is not
reached). Shifting by the row maximum before dividing makes every accepted
temperature safe: with T = 1e-39 the maximum stays 0 and every other entry
goes to -inf, i.e. the sample is the argmax, instead of inf - inf = nan.

A row whose scores are not finite (a model fault) raises `RowError` naming
that row, so the engine can end that request alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ensemble.vocab import EOS_TOKEN_ID


class RowError(Exception):
    """Sampling failed for one row (index `row`); the others are unaffected."""

    def __init__(self, row: int, message: str):
        super().__init__(message)
        self.row = row


@dataclass
class RowParams:
    """What the sampler needs of one request at this step."""
    greedy: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    mask_eos: bool = False          # min_new_tokens not reached yet
    generator: torch.Generator | None = None
    want_logprob: bool = False
    top_n: int = 0


@dataclass
class Sampled:
    token: int
    logprob: float | None
    top: list[tuple[int, float]]


def _check_finite(lp: torch.Tensor) -> None:
    bad = ~torch.isfinite(lp.max(dim=-1).values) | torch.isnan(lp).any(dim=-1)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise RowError(r, f"row {r}: the model's scores are not finite")


def sample(lp: torch.Tensor, params: list[RowParams]) -> list[Sampled]:
    """Next token (and requested log-probs) of every row of `lp` (B, V); float32 or wider."""
    lp = lp.float()
    b, v = lp.shape
    assert b == len(params)
    _check_finite(lp)
    scores = lp
    eos_rows = [i for i, p in enumerate(params) if p.mask_eos]
    if eos_rows:
        scores = lp.clone()
        scores[eos_rows, EOS_TOKEN_ID] = float("-inf")
    tokens = scores.argmax(dim=-1)            # greedy rows (and the fallback of every row)

    samp = [i for i, p in enumerate(params) if not p.greedy]
    if samp:
        idx_rows = torch.tensor(samp)
        x = scores[idx_rows]
        x = x - x.max(dim=-1, keepdim=True).values               # <= 0, max exactly 0
        temp = torch.tensor([params[i].temperature for i in samp], dtype=x.dtype)[:, None]
        x = x / temp                                             # 0 / T = 0; negatives may reach -inf
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        k = torch.tensor([params[i].top_k if 0 < params[i].top_k < v else v for i in samp])
        kth = sorted_x.gather(1, (k - 1)[:, None])
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
        top_p = torch.tensor([params[i].top_p for i in samp], dtype=x.dtype)[:, None]
        probs = torch.softmax(sorted_x, dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = (cum - probs) >= top_p              # keep the smallest prefix reaching top_p (the max always)
        sorted_x = sorted_x.masked_fill(drop & (top_p < 1.0), float("-inf"))
        probs = torch.softmax(sorted_x, dim=-1)
        cum = probs.cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=params[i].generator, dtype=torch.float64) for i in samp])
        target = (u.to(cum.dtype) * cum[:, -1])[:, None]
        pos = (cum < target).sum(dim=-1).clamp_(max=v - 1)       # first index whose CDF reaches u
        tokens[idx_rows] = order.gather(1, pos[:, None]).squeeze(1)

    tok_list = tokens.tolist()
    max_n = max((p.top_n for p in params), default=0)
    top_v = top_i = None
    if max_n:
        top_v, top_i = torch.topk(lp, max_n, dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
    want = [i for i, p in enumerate(params) if p.want_logprob]
    chosen_lp = {}
    if want:
        w = torch.tensor(want)
        vals = lp[w, tokens[w]].tolist()
        chosen_lp = dict(zip(want, vals))
    out = []
    for i, p in enumerate(params):
        top = list(zip(top_i[i][:p.top_n], top_v[i][:p.top_n])) if p.top_n else []
        out.append(Sampled(tok_list[i], chosen_lp.get(i), top))
    return out
