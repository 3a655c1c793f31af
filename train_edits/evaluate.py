"""Evaluation: success rate, hard negatives, rest-of-prompt loss (paper §3, §7).

Scorers return the summed NLL (nats) of each scored span:

- :class:`BackpackScorer`: the Backpack alone, through the core's forward
  (``sense_edits=`` the pack's deltas), log-softmax over its full vocabulary.
- :class:`EnsembleScorer`: log_softmax_U(z[U] + β·(E δ)[U]) with the large
  model's logits z and the Backpack's δ; rows without an edited token get the
  large model alone (exact skip). β = 0 or no edits is the large model.

Metrics of one task: ``success`` (fraction of eval examples that do not fail),
``hard_neg`` (mean over hard negatives of the summed suffix NLL; with ``hard_neg_text`` the
records are scored as whole texts prefix+suffix and ``hard_neg`` is the per-token mean NLL over
all of them, as upstream's ``configs/hard_neg`` do for verb_conjugation and stereoset),
``rest_of_prompt`` (per-token mean NLL over the unconditional texts, first
token of each text not scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ensemble.delta import logit_delta, sequence_deltas
from ensemble.sense_head import SenseHeadLM

from .calibrate import _device, large_logits
from .encoding import EncodedExample, Scored, encode_example, pad_batch
from .tasks import LossType, SingleExample, TaskData, TextExample, example_score, is_failure


class _Scorer:
    """Summed suffix NLLs of many sequences, batched by length. A scorer has one or more *variants*
    (EnsembleScorer: before and every ε in one pass over the data); `_batch` returns (variants, b)."""

    batch_size = 8
    n_variants = 1
    progress: str | None = None  # a tqdm description, or None for no bar
    device: torch.device  # where `_batch` wants its inputs; set by each subclass

    @torch.no_grad()
    def nll_sums_all(self, seqs: Sequence[Scored]) -> torch.Tensor:
        """(variants, len(seqs)) float64 summed NLLs."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
        out = torch.zeros(self.n_variants, len(seqs), dtype=torch.float64)
        starts = range(0, len(order), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=self.progress, unit="batch", leave=False)
        for b0 in starts:
            idx = order[b0 : b0 + self.batch_size]
            ids, tgt, mask = pad_batch([seqs[i] for i in idx])
            dev = self.device
            sums = self._batch(ids.to(dev), tgt.to(dev), mask.to(dev)).cpu().reshape(self.n_variants, len(idx))
            out[:, idx] = sums
        return out

    def nll_sums(self, seqs: Sequence[Scored]) -> list[float]:
        """Summed NLLs of the first (or only) variant."""
        return self.nll_sums_all(seqs)[0].tolist()

    def _batch(self, ids, tgt, mask) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class BackpackScorer(_Scorer):
    """The Backpack alone. `variants` [edits or None, ...] are all scored in one pass: α and the senses are
    computed once per batch (α never depends on the edits), the edits added per variant."""

    def __init__(
        self,
        model,
        edits=None,
        batch_size: int = 8,
        progress: str | None = None,
        variants: Sequence | None = None,
    ):
        self.model, self.batch_size, self.progress = model, batch_size, progress
        self.device = model.embedding.device
        variants = list(variants) if variants is not None else [edits]
        self.variants = [None if e is None or not len(e) else e.to(self.device) for e in variants]
        self.n_variants = len(self.variants)

    @property
    def edits(self):
        return self.variants[0]

    def _batch(self, ids, tgt, mask):
        # The core's forward, with the LM head applied only at the scored positions.
        from ensemble.backpack import add_sense_edits

        alpha = self.model.contextualize(ids)
        base = self.model.sense_vectors(ids)
        sel = mask.bool()
        out = []
        for edits in self.variants:
            senses = base if edits is None else add_sense_edits(base, ids, edits)
            hidden = torch.matmul(alpha, senses).sum(dim=1)
            logits = torch.nn.functional.linear(hidden[sel], self.model.embedding).float()
            out.append(_scatter_rows(logits, tgt[sel], sel))
        return torch.stack(out)


class EnsembleScorer(_Scorer):
    """log_softmax_U(z + β·E·δ) at the scored positions. `variants` [(edits, β), ...] are all scored in
    the same pass (the large model runs once per batch for every variant; `(None, 0)` is the large
    model alone); without `variants`, the one variant is (edits, beta)."""

    def __init__(
        self,
        large,
        backpack,
        edits=None,
        beta: float = 0.0,
        batch_size: int = 8,
        *,
        vocab_size: int,
        variants: Sequence[tuple] | None = None,
        progress: str | None = None,
    ):
        self.large, self.backpack, self.batch_size = large, backpack, batch_size
        self.vocab_size = vocab_size  # |U| of the run's tokenizer
        self.device = _device(large)
        variants = list(variants) if variants is not None else [(edits, beta)]
        self.variants = [
            (None if e is None or not len(e) or not b else e.to(self.device), float(b)) for e, b in variants
        ]
        self.n_variants = len(self.variants)
        self.progress = progress
        self.E = backpack.embedding.detach()[:vocab_size].float().to(self.device)

    @property
    def edits(self):
        return self.variants[0][0]

    @property
    def beta(self) -> float:
        return self.variants[0][1]

    def _batch(self, ids, tgt, mask):
        sel = mask.bool()
        hidden = None
        if isinstance(self.backpack, SenseHeadLM) and self.backpack.large is self.large:
            # a sense head attached to this large model reads the hidden states of this very pass
            hidden = self.large.base_model(input_ids=ids).last_hidden_state
            z = self.large.get_output_embeddings()(hidden[sel])[..., : self.vocab_size].float()
        else:
            z = scored_large_logits(self.large, ids, sel, self.vocab_size)  # (m, U) at the scored positions only
        out = []
        alpha = None
        for edits, beta in self.variants:
            zz = z
            if edits is not None:
                rows = torch.isin(ids, edits.token_ids).any(-1).nonzero().flatten()
                if len(rows):
                    if alpha is None:  # α never depends on the edits: one Backpack pass serves every variant
                        bp_ids = ids.to(self.backpack.embedding.device)
                        alpha = self.backpack.contextualize(bp_ids, hidden=hidden) if hidden is not None else None
                        if alpha is None:
                            alpha = self.backpack.contextualize(bp_ids)
                        alpha = alpha.float().to(ids.device)
                    delta = torch.zeros(*ids.shape, self.E.shape[1], device=ids.device)
                    delta[rows] = sequence_deltas(alpha[rows], ids[rows], edits.to(dtype=alpha.dtype)).float()
                    zz = z + beta * logit_delta(delta[sel], self.E, self.vocab_size)
            out.append(_scatter_rows(zz, tgt[sel], sel))
        return torch.stack(out)


def scored_large_logits(large, ids: torch.Tensor, sel: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The large model's logits over U at the selected positions only (LM head on those rows)."""
    base = getattr(large, "base_model", None)
    head = large.get_output_embeddings() if hasattr(large, "get_output_embeddings") else None
    if base is None or head is None or base is large:
        return large_logits(large, ids, vocab_size)[sel]
    hidden = base(input_ids=ids).last_hidden_state[sel]
    return head(hidden)[..., :vocab_size].float()


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
    hard_neg_text: bool = False  # hard negatives as whole texts, per-token mean (upstream configs/hard_neg)

    @classmethod
    def encode(
        cls,
        tokenizer,
        data: TaskData,
        max_len: int,
        max_eval: int | None = None,
        max_train: int | None = None,
        hard_neg_text: bool = False,
    ) -> EncodedTask:
        def enc(exs, limit=None):
            out = [encode_example(tokenizer, e, max_len, data.name) for e in (exs[:limit] if limit else exs)]
            return [e for e in out if e is not None]

        hard_neg = data.hard_neg
        if hard_neg_text:  # upstream's unconditional iterator: one text, tokenized whole (utils.py:180-196)
            singles = [e for e in hard_neg if isinstance(e, SingleExample)]
            if len(singles) != len(hard_neg):
                raise ValueError(
                    f"task {data.name}: hard negatives scored as whole texts must be prefix/suffix records"
                )
            hard_neg = [TextExample(e.prefix + e.suffix, e.line) for e in singles]
        t = cls(
            data.name,
            data.loss_type,
            data.threshold,
            enc(data.train, max_train),
            enc(data.eval, max_eval),
            enc(hard_neg, max_eval),
            enc(data.unconditional, max_eval),
            hard_neg_text=hard_neg_text,
        )
        t.truncated = sum(
            s.truncated for group in (t.train, t.eval, t.hard_neg, t.unconditional) for e in group for s in e.seqs
        )
        return t


def _successes(
    sums: torch.Tensor, examples: Sequence[EncodedExample], loss_type: LossType, threshold: float
) -> list[float]:
    """Success rate per variant from (variants, sequences) summed NLLs."""
    rates = []
    for row in sums.tolist():
        ok, i = 0, 0
        for e in examples:
            nlls = row[i : i + len(e.seqs)]
            i += len(e.seqs)
            ok += not is_failure(example_score(loss_type, *nlls), threshold)
        rates.append(ok / max(len(examples), 1))
    return rates


def success_rate(scorer, examples: Sequence[EncodedExample], loss_type: LossType, threshold: float) -> float:
    flat = [s for e in examples for s in e.seqs]
    return _successes(scorer.nll_sums_all(flat)[:1], examples, loss_type, threshold)[0]


def task_metrics_all(scorer, task: EncodedTask) -> list[dict]:
    """The task's metrics for every variant of the scorer (one pass over each data set)."""
    n = scorer.n_variants
    outs: list[dict] = [{} for _ in range(n)]
    flat = [s for e in task.eval for s in e.seqs]
    for out, rate in zip(
        outs, _successes(scorer.nll_sums_all(flat), task.eval, task.loss_type, task.threshold), strict=True
    ):
        out.update(success=rate, n_eval=len(task.eval))
    if task.hard_neg:
        seqs = [e.seqs[0] for e in task.hard_neg]
        sums = scorer.nll_sums_all(seqs)
        for out, row in zip(outs, sums, strict=True):
            # whole texts: per-token mean over all records (upstream normalize='token'); else per-record mean
            hn = float(row.sum()) / sum(s.n for s in seqs) if task.hard_neg_text else float(row.mean())
            out.update(hard_neg=hn, n_hard_neg=int(row.numel()))
    else:
        for out in outs:
            out["hard_neg"] = None
    if task.unconditional:
        seqs = [e.seqs[0] for e in task.unconditional]
        sums = scorer.nll_sums_all(seqs)
        for out, row in zip(outs, sums, strict=True):
            out["rest_of_prompt"] = float(row.sum()) / sum(s.n for s in seqs)
    else:
        for out in outs:
            out["rest_of_prompt"] = None
    return outs


def task_metrics(scorer, task: EncodedTask) -> dict:
    return task_metrics_all(scorer, task)[0]


# ---------------------------------------------------------------------------------------------- fluency


def repeated_ngram_rate(tokens: Sequence[int], n: int = 3) -> float:
    """1 − distinct / total n-grams of one continuation (0: no n-gram repeats; "Lima Lima Lima Lima" → high)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def greedy_fluency(
    ensemble,
    prompts: Sequence[Sequence[int]],
    variants: Sequence[tuple],
    max_new_tokens: int = 24,
    n: int = 3,
) -> list[dict]:
    """Greedy continuations of `prompts` under each (edits, β) variant ((None, 0): the large model alone), with
    the mean repeated-n-gram rate and the fraction of continuations in which some n-gram repeats, per variant."""
    from ensemble.edits import PackRef

    out = []
    base: list[list[int]] | None = None
    for i, (edits, beta) in enumerate(variants):
        packs = [PackRef("eval", str(i), edits, float(beta))] if edits is not None and len(edits) and beta else []
        if packs or base is None:
            conts = ensemble.generate_greedy([list(p) for p in prompts], [packs] * len(prompts), max_new_tokens)
        else:  # an empty pack is the large model alone: the same continuations
            conts = base
        if not packs:
            base = conts
        rates = [repeated_ngram_rate(c, n) for c in conts]
        out.append(
            {
                "n": n,
                "prompts": len(prompts),
                "max_new_tokens": max_new_tokens,
                "repeated_ngram_rate": sum(rates) / max(len(rates), 1),
                "with_repeat": sum(r > 0 for r in rates) / max(len(rates), 1),
                "continuations": conts,
            }
        )
    return out
