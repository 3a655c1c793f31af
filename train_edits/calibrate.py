"""β calibration against a target large model, one pass over G for the whole grid.

For each ε, β is the largest grid value whose ensemble G loss is in the ball:

    NLL_G(ens_β) / NLL_G(large) < 1 + ε        (β = 0 is the large model itself)

with log p_ens = log_softmax_U(z[U] + β·(E δ)[U]) over the shared vocabulary
U = [0, vocab_size) of the run's tokenizer (50257 for GPT-2), NLL micro-averaged
per token, first token of each chunk not scored. The paper searches β downwards
with one full G pass per β; here each G batch is read once: the large model's
logits z are computed once and reused
for every β and every ε, the Backpack's α once per batch (only for rows that
contain an edited token), and every position with δ = 0 (before a row's first
edited token, or rows without one) contributes the base NLL with no work.
The β = 0 base is computed in the same pass from the same z (paired).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ensemble.delta import logit_delta, sequence_deltas
from ensemble.edits import SenseEdits

from .finetune import in_ball

DEFAULT_GRID = tuple(round(1.0 - 0.1 * i, 1) for i in range(11))  # 1.0, 0.9, ..., 0.0


@dataclass
class CalibrationResult:
    grid: list[float]
    base_nll: float  # mean per-token NLL of the large model on G
    ratios: dict[float, dict[float, float]]  # ε -> β -> ratio
    beta: dict[float, float]  # ε -> chosen β
    tokens: int
    batches: int
    positions_computed: int = 0  # positions where δ ≠ 0 (the only ones that cost extra)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "grid": self.grid,
            "base_nll": self.base_nll,
            "tokens": self.tokens,
            "batches": self.batches,
            "positions_computed": self.positions_computed,
            "per_epsilon": {
                f"{eps:g}": {
                    "beta": self.beta[eps],
                    "ratio": self.ratios[eps][self.beta[eps]],
                    "ratios": {f"{b:g}": r for b, r in self.ratios[eps].items()},
                }
                for eps in self.ratios
            },
            "notes": self.notes,
        }


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def large_logits(large, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The large model's logits over U = [0, vocab_size), float32."""
    out = large(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"large model: {logits.shape[-1]} output rows do not cover the tokenizer's {vocab_size} ids")
    return logits[..., :vocab_size].float()


def _common_step(betas: Sequence[float], max_steps: int = 64) -> tuple[float, list[int]] | None:
    """(h, [k]) with β_i = k_i·h for a grid on a uniform step (1.0, 0.9, ... -> h = 0.1), else None."""
    top = max(betas)
    for n in range(1, max_steps + 1):
        h = top / n
        ks = [round(b / h) for b in betas]
        if all(abs(k * h - b) <= 1e-9 * max(1.0, b) for k, b in zip(ks, betas, strict=True)):
            return h, ks
    return None


def grid_logsumexp(z: torch.Tensor, e: torch.Tensor, betas: Sequence[float]) -> dict[float, torch.Tensor]:
    """logsumexp_v(z + β e) over the last dim for every β > 0 of a grid, sharing the exponentials.

    On a uniform grid (β = k·h, β ≤ 1) it computes w = exp(z − M) and q = exp(h·e) once and
    then w·q^k by repeated multiplication: two exp passes for the whole grid instead of one
    per β. M = max z + max(e, 0) bounds every exponent so nothing overflows. Other grids
    fall back to one logsumexp per β.
    """
    step = _common_step(betas)
    if step is None or max(betas) > 1.0:
        return {b: torch.logsumexp(torch.add(z, e, alpha=b), dim=-1) for b in betas}
    h, ks = step
    M = z.max(-1, keepdim=True).values + e.max(-1, keepdim=True).values.clamp(min=0)
    w = torch.exp(z - M)
    q = torch.exp(e * h)
    want = {k: b for k, b in zip(ks, betas, strict=True)}
    out = {}
    for k in range(1, max(ks) + 1):
        w.mul_(q)
        if k in want:
            out[want[k]] = torch.log(w.sum(-1)) + M.squeeze(-1)
    return out


def choose_beta(ratios: dict[float, float], eps: float) -> float:
    """Largest β with ratio strictly below 1+ε; 0.0 (the large model alone) if none."""
    ok = [b for b, r in ratios.items() if in_ball(r, eps)]
    return max(ok) if ok else 0.0


@torch.no_grad()
def calibrate(
    large,
    backpack,
    g_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    edits_by_eps: Mapping[float, SenseEdits],
    grid: Sequence[float] = DEFAULT_GRID,
    progress: bool = False,
    total: int | None = None,
    block: int = 256,
    *,
    vocab_size: int,
) -> CalibrationResult:
    """One pass over ``g_batches`` ((ids (b,s), mask (b,s)) with mask marking scored rows).

    ``vocab_size``: |U| of the run's tokenizer (ensemble.vocab.Vocabulary.size).
    """
    grid = sorted({float(b) for b in grid}, reverse=True)
    nonzero = [b for b in grid if b != 0.0]
    E = None
    epsilons = list(edits_by_eps)
    token_sets = {eps: set(e.token_ids.tolist()) for eps, e in edits_by_eps.items()}
    all_tokens = torch.tensor(sorted(set().union(*token_sets.values())) if token_sets else [], dtype=torch.long)
    base_sum = 0.0
    diff = {eps: {b: 0.0 for b in nonzero} for eps in epsilons}
    tokens = batches = computed = 0
    it = tqdm(g_batches, desc="calibrate (G)", total=total, leave=False, disable=not progress)
    for ids, mask in it:
        batches += 1
        z = large_logits(large, ids.to(_device(large)), vocab_size)  # (b, s, U) once per batch
        dev = z.device
        ids, mask = ids.to(dev), mask.to(dev)
        if E is None:
            E = backpack.embedding.detach()[:vocab_size].float().to(dev)
            all_tokens = all_tokens.to(dev)
        tgt = ids[:, 1:]
        m = mask[:, :-1].bool()
        zs = z[:, :-1]
        lse = torch.logsumexp(zs, dim=-1)
        base_tok = lse - zs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (b, s-1)
        base_sum += float(base_tok[m].double().sum())
        tokens += int(m.sum())
        if not len(all_tokens) or not nonzero:
            continue
        rows = torch.isin(ids, all_tokens).any(-1).nonzero().flatten()
        if not len(rows):
            continue
        sub = ids[rows]
        alpha = backpack.contextualize(sub.to(backpack.embedding.device)).float().to(dev)  # once per batch
        for eps in epsilons:
            edits = edits_by_eps[eps]
            if not len(edits) or not bool(edits.deltas.abs().sum() > 0):
                continue
            tok = torch.tensor(sorted(token_sets[eps]), dtype=torch.long, device=dev)
            hit = torch.isin(sub, tok)
            first = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(rows, sub.shape[1]))
            pos = torch.arange(sub.shape[1] - 1, device=dev)
            active = (pos[None, :] >= first[:, None]) & m[rows]  # δ ≠ 0 and scored
            if not active.any():
                continue
            delta = sequence_deltas(alpha, sub, edits.to(dev, alpha.dtype))[:, :-1]  # (r, s-1, d)
            r_idx, p_idx = active.nonzero(as_tuple=True)
            computed += len(r_idx)
            # blocks of positions keep the (positions × U) temporaries small
            for b0 in range(0, len(r_idx), block):
                ri, pi = r_idx[b0 : b0 + block], p_idx[b0 : b0 + block]
                e = logit_delta(delta[ri, pi].float(), E, E.shape[0])  # (m, U)
                zz = zs[rows[ri], pi]  # (m, U)
                y = tgt[rows[ri], pi]
                base_here = base_tok[rows[ri], pi]
                zy, ey = zz.gather(-1, y[:, None]).squeeze(-1), e.gather(-1, y[:, None]).squeeze(-1)
                for b, lse in grid_logsumexp(zz, e, nonzero).items():
                    nll = lse - (zy + b * ey)
                    diff[eps][b] += float((nll - base_here).double().sum())
                del e, zz
    if tokens == 0:
        raise ValueError("calibrate: G has no scored tokens")
    base_mean = base_sum / tokens
    ratios: dict[float, dict[float, float]] = {}
    beta: dict[float, float] = {}
    for eps in epsilons:
        ratios[eps] = {b: (1.0 if b == 0.0 else (base_sum + diff[eps][b]) / base_sum) for b in grid}
        beta[eps] = choose_beta(ratios[eps], eps)
    notes = []
    if 0.0 not in grid:
        notes.append("grid lacks 0.0; β = 0 (the large model alone) is used when no grid value is in the ball")
    return CalibrationResult(grid, base_mean, ratios, beta, tokens, batches, computed, notes)
