"""The batched sampler: one decode step's next tokens for every running row.

Given the step's log-probs ``lp`` (B, V) and each row's parameters, the rows
are sampled together on batched tensors (no Python loop over the vocabulary).
First the scores s = lp are adjusted (vLLM's order and semantics, on log-probs):

    s[v] += logit_bias[v]
    s[v]  = s[v] / rep if s[v] > 0 else s[v] * rep     for v in the prompt or the output
    s[v] -= frequency · count_out(v) + presence · [count_out(v) > 0]
    s[v]  = -inf    for EOS and the stop token ids while min_new_tokens is not reached
    s[v]  = -inf    for the tokens the row's response_format grammar forbids (serve.structured)

then greedy rows take ``argmax s`` and sampled rows

    x      = (s - max_v s) / T                   # shifted first: x <= 0, so no T overflows it
    x[v]   = -inf  where x[v] < log(min_p)       # min_p: p(v) < min_p · max p
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
from typing import Any

import torch

from serve.sampling_params import SamplingParams
from serve.structured import mask_rows


class RowError(Exception):
    """Sampling failed for one row (index `row`); the others are unaffected."""

    def __init__(self, row: int, message: str):
        super().__init__(message)
        self.row = row


@dataclass
class RowParams:
    """What the sampler needs of one request at this step: its parameters and where its output stands."""

    sampling: SamplingParams
    mask_eos: bool = False  # min_new_tokens not reached yet
    generator: torch.Generator | None = None
    prompt_ids: list[int] | None = None  # for the repetition penalty
    output_ids: list[int] | None = None  # for all three penalties
    mask_stop_ids: bool = False  # min_new_tokens not reached: stop_token_ids masked too
    grammar: Any = None  # serve.structured.GrammarState: the tokens it forbids are masked


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


def _penalize(scores: torch.Tensor, params: list[RowParams], rows: list[int]) -> None:
    """Repetition / presence / frequency penalties of `rows`, in place, on one (len(rows), V) batch."""
    n, v = len(rows), scores.shape[1]
    counts = torch.zeros(n * v, dtype=scores.dtype)
    seen = torch.zeros(n * v, dtype=torch.bool)
    for j, i in enumerate(rows):
        out = torch.tensor(params[i].output_ids or [], dtype=torch.long)
        counts.index_add_(0, out + j * v, torch.ones(len(out), dtype=scores.dtype))
        seen[torch.tensor(params[i].prompt_ids or [], dtype=torch.long) + j * v] = True
    counts = counts.view(n, v)
    seen = seen.view(n, v) | (counts > 0)
    idx = torch.tensor(rows)
    sub = scores[idx]
    rep = torch.tensor([params[i].sampling.repetition_penalty for i in rows], dtype=sub.dtype)[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([params[i].sampling.frequency_penalty for i in rows], dtype=sub.dtype)[:, None]
    pres = torch.tensor([params[i].sampling.presence_penalty for i in rows], dtype=sub.dtype)[:, None]
    scores[idx] = sub - freq * counts - pres * (counts > 0).to(sub.dtype)


def sample(lp: torch.Tensor, params: list[RowParams], eos_id: int) -> list[Sampled]:
    """Next token (and requested log-probs) of every row of `lp` (B, V); float32 or wider.
    `eos_id`: the served vocabulary's EOS (masked while a row's min_new_tokens is not reached)."""
    lp = lp.float()
    b, v = lp.shape
    assert b == len(params)
    _check_finite(lp)
    scores = lp
    bias_rows = [(i, p.sampling.logit_bias) for i, p in enumerate(params) if p.sampling.logit_bias]
    pen_rows = [i for i, p in enumerate(params) if p.sampling.penalized]
    eos_rows = [i for i, p in enumerate(params) if p.mask_eos or (p.mask_stop_ids and p.sampling.stop_token_ids)]
    gram_rows = [i for i, p in enumerate(params) if p.grammar is not None]
    if bias_rows or pen_rows or eos_rows or gram_rows:
        scores = lp.clone()
    for i, bias in bias_rows:
        ids = torch.tensor(list(bias), dtype=torch.long)
        scores[i, ids] += torch.tensor(list(bias.values()), dtype=scores.dtype)
    if pen_rows:
        _penalize(scores, params, pen_rows)
    for i in eos_rows:
        p = params[i]
        scores[i, [eos_id] * p.mask_eos + list(p.sampling.stop_token_ids) * p.mask_stop_ids] = float("-inf")
    if gram_rows:
        mask_rows(scores, gram_rows, [params[i].grammar for i in gram_rows])
        dead = ~torch.isfinite(scores[torch.tensor(gram_rows)].max(dim=-1).values)
        if bool(dead.any()):
            r = gram_rows[int(dead.nonzero()[0, 0])]
            raise RowError(r, f"row {r}: response_format allows no token here (min_tokens or logit_bias exclude it)")
    tokens = scores.argmax(dim=-1)  # greedy rows (and the fallback of every row)

    samp = [i for i, p in enumerate(params) if not p.sampling.greedy]
    if samp:
        idx_rows = torch.tensor(samp)
        x = scores[idx_rows]
        x = x - x.max(dim=-1, keepdim=True).values  # <= 0, max exactly 0
        temp = torch.tensor([params[i].sampling.temperature for i in samp], dtype=x.dtype)[:, None]
        x = x / temp  # 0 / T = 0; negatives may reach -inf
        min_p = torch.tensor([params[i].sampling.min_p for i in samp], dtype=torch.float64)
        x = x.masked_fill(x < torch.log(min_p).to(x.dtype)[:, None], float("-inf"))  # min_p 0: log 0 = -inf
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        k = torch.tensor([params[i].sampling.top_k if 0 < params[i].sampling.top_k < v else v for i in samp])
        kth = sorted_x.gather(1, (k - 1)[:, None])
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
        top_p = torch.tensor([params[i].sampling.top_p for i in samp], dtype=x.dtype)[:, None]
        probs = torch.softmax(sorted_x, dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = (cum - probs) >= top_p  # keep the smallest prefix reaching top_p (the max always)
        sorted_x = sorted_x.masked_fill(drop & (top_p < 1.0), float("-inf"))
        probs = torch.softmax(sorted_x, dim=-1)
        cum = probs.cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=params[i].generator, dtype=torch.float64) for i in samp])
        target = (u.to(cum.dtype) * cum[:, -1])[:, None]
        pos = (cum < target).sum(dim=-1).clamp_(max=v - 1)  # first index whose CDF reaches u
        tokens[idx_rows] = order.gather(1, pos[:, None]).squeeze(1)

    tok_list = tokens.tolist()
    max_n = max((p.sampling.top_n for p in params), default=0)
    top_v: list[list[float]] = []
    top_i: list[list[int]] = []
    if max_n:  # every row with top_n > 0 is covered
        best = torch.topk(lp, max_n, dim=-1)
        top_v, top_i = best.values.tolist(), best.indices.tolist()
    want = [i for i, p in enumerate(params) if p.sampling.want_logprobs]
    chosen_lp = {}
    if want:
        w = torch.tensor(want)
        vals = lp[w, tokens[w]].tolist()
        chosen_lp = dict(zip(want, vals, strict=True))
    out = []
    for i, p in enumerate(params):
        n = p.sampling.top_n
        top = list(zip(top_i[i][:n], top_v[i][:n], strict=True)) if n else []
        out.append(Sampled(tok_list[i], chosen_lp.get(i), top))
    return out
