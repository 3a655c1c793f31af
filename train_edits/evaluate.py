"""Evaluation: success rate, hard negatives, rest-of-prompt loss (paper §3, §7).

Scorers return the summed NLL (nats) of each scored span:

- :class:`BackpackScorer`: the Backpack alone, through the core's forward
  (``sense_edits=`` the pack's deltas), log-softmax over its full vocabulary.
- :class:`EnsembleScorer`: log_softmax_U(z[U] + β·(E δ)[U]) with the large
  model's logits z and the Backpack's δ; rows without an edited token get the
  large model alone (exact skip). β = 0 or no edits is the large model.

Metrics of one task: ``success`` (fraction of eval examples that do not fail),
``hard_neg`` (mean over hard negatives of the summed suffix NLL),
``rest_of_prompt`` (per-token mean NLL over the unconditional texts, first
token of each text not scored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .calibrate import SHARED_VOCAB, _device, large_logits
from .compute import sequence_deltas
from .encoding import EncodedExample, Scored, encode_example, pad_batch
from .tasks import LossType, TaskData, example_score, is_failure


class _Scorer:
    batch_size = 8

    @torch.no_grad()
    def nll_sums(self, seqs: Sequence[Scored]) -> list[float]:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
        out = [0.0] * len(seqs)
        for b0 in range(0, len(order), self.batch_size):
            idx = order[b0:b0 + self.batch_size]
            ids, tgt, mask = pad_batch([seqs[i] for i in idx])
            dev = self.device
            sums = self._batch(ids.to(dev), tgt.to(dev), mask.to(dev)).cpu()
            for j, i in enumerate(idx):
                out[i] = float(sums[j])
        return out

    def _batch(self, ids, tgt, mask) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class BackpackScorer(_Scorer):
    def __init__(self, model, edits=None, batch_size: int = 8):
        self.model, self.batch_size = model, batch_size
        self.device = model.embedding.device
        self.edits = None if edits is None else edits.to(self.device)

    def _batch(self, ids, tgt, mask):
        # The core's forward, with the LM head applied only at the scored positions.
        from ensemble.backpack import add_sense_edits

        alpha = self.model.contextualize(ids)
        senses = self.model.sense_vectors(ids)
        if self.edits is not None:
            senses = add_sense_edits(senses, ids, self.edits)
        hidden = torch.matmul(alpha, senses).sum(dim=1)
        sel = mask.bool()
        logits = torch.nn.functional.linear(hidden[sel], self.model.embedding).float()
        return _scatter_rows(logits, tgt[sel], sel)


class EnsembleScorer(_Scorer):
    def __init__(self, large, backpack, edits=None, beta: float = 0.0, batch_size: int = 8):
        self.large, self.backpack, self.beta, self.batch_size = large, backpack, beta, batch_size
        self.device = _device(large)
        self.edits = None if edits is None else edits.to(self.device)
        self.E = backpack.embedding.detach()[:SHARED_VOCAB].float().to(self.device)

    def _batch(self, ids, tgt, mask):
        sel = mask.bool()
        z = scored_large_logits(self.large, ids, sel)  # (m, U) at the scored positions only
        if self.edits is not None and len(self.edits) and self.beta:
            rows = torch.isin(ids, self.edits.token_ids).any(-1).nonzero().flatten()
            if len(rows):
                sub = ids[rows]
                alpha = self.backpack.contextualize(sub.to(self.backpack.embedding.device)).float().to(ids.device)
                delta = torch.zeros(*ids.shape, self.E.shape[1], device=ids.device)
                delta[rows] = sequence_deltas(alpha, sub, self.edits.to(dtype=alpha.dtype)).float()
                z = z + self.beta * (delta[sel] @ self.E.T)
        return _scatter_rows(z, tgt[sel], sel)


def scored_large_logits(large, ids: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """The large model's logits over U at the selected positions only (LM head on those rows)."""
    base = getattr(large, "base_model", None)
    head = large.get_output_embeddings() if hasattr(large, "get_output_embeddings") else None
    if base is None or head is None or base is large:
        return large_logits(large, ids)[sel]
    hidden = base(input_ids=ids).last_hidden_state[sel]
    return head(hidden)[..., :SHARED_VOCAB].float()


def _scatter_rows(logits: torch.Tensor, targets: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Summed NLL per batch row from logits at the selected positions (row-major order)."""
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none").double()
    rows = sel.nonzero()[:, 0]
    return torch.zeros(sel.shape[0], dtype=torch.float64, device=nll.device).index_add_(0, rows, nll)


@dataclass
class EncodedTask:
    name: str
    loss_type: LossType
    threshold: float
    train: list[EncodedExample]
    eval: list[EncodedExample]
    hard_neg: list[EncodedExample]
    unconditional: list[EncodedExample]
    truncated: int = 0

    @classmethod
    def encode(cls, tokenizer, data: TaskData, max_len: int, max_eval: int | None = None,
               max_train: int | None = None) -> "EncodedTask":
        def enc(exs, limit=None):
            out = [encode_example(tokenizer, e, max_len, data.name) for e in (exs[:limit] if limit else exs)]
            return [e for e in out if e is not None]

        t = cls(data.name, data.loss_type, data.threshold, enc(data.train, max_train), enc(data.eval, max_eval),
                enc(data.hard_neg, max_eval), enc(data.unconditional, max_eval))
        t.truncated = sum(s.truncated for group in (t.train, t.eval, t.hard_neg, t.unconditional)
                          for e in group for s in e.seqs)
        return t


def success_rate(scorer, examples: Sequence[EncodedExample], loss_type: LossType, threshold: float) -> float:
    flat = [s for e in examples for s in e.seqs]
    sums = scorer.nll_sums(flat)
    ok, i = 0, 0
    for e in examples:
        nlls = sums[i:i + len(e.seqs)]
        i += len(e.seqs)
        ok += not is_failure(example_score(loss_type, *nlls), threshold)
    return ok / max(len(examples), 1)


def task_metrics(scorer, task: EncodedTask) -> dict:
    out: dict = {"success": success_rate(scorer, task.eval, task.loss_type, task.threshold),
                 "n_eval": len(task.eval)}
    if task.hard_neg:
        sums = scorer.nll_sums([e.seqs[0] for e in task.hard_neg])
        out["hard_neg"] = sum(sums) / len(sums)
        out["n_hard_neg"] = len(sums)
    else:
        out["hard_neg"] = None
    if task.unconditional:
        seqs = [e.seqs[0] for e in task.unconditional]
        sums = scorer.nll_sums(seqs)
        out["rest_of_prompt"] = sum(sums) / sum(s.n for s in seqs)
    else:
        out["rest_of_prompt"] = None
    return out
