"""The logit-difference ensemble: the large model's logits plus the Backpack's β·E·δ.

    log p_ens(·|x≤t) = log_softmax_U( z_t[U] + Σ_p β_p·(E δ_{t,p})[U] ),  U = [0, |tokenizer|)

`EnsembleBatch` is what an engine drives: sequences join (`add`) and leave
(`remove`) between steps, `logprobs()` gives every row's next-token
distribution, `append()` feeds the chosen tokens. `generate_greedy` and
`score` are the reference decode and teacher-forced scoring built on it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .backpack import BackpackLM
from .delta import DeltaStats, DeltaTracker, logit_delta, sequence_deltas
from .edits import CombinedEditsCache, PackKey, PackRef, SenseEdits, pack_key
from .large_batch import LargeModelBatch, full_logits
from .large_model import model_context_limit, model_fingerprint
from .sense_head import SenseHeadLM
from .vocab import Vocabulary


class Ensemble:
    """A pairing (tokenizer, Backpack, large model) on the shared vocabulary U = [0, vocab.size).

    `vocab` is derived from `tokenizer` unless given; both models' output rows must cover it
    (rows past U are padding: never scored, never sampled).
    """

    def __init__(
        self,
        large_model: PreTrainedModel,
        backpack: BackpackLM | SenseHeadLM,
        tokenizer: PreTrainedTokenizerBase | None = None,
        window_keep: int | None = None,
        vocab: Vocabulary | None = None,
    ):
        if vocab is None:
            if tokenizer is None:
                raise ValueError("Ensemble: pass the pairing's tokenizer (or its Vocabulary as vocab=)")
            vocab = Vocabulary.from_tokenizer(tokenizer)
        elif tokenizer is not None and len(tokenizer) != vocab.size:
            raise ValueError(f"Ensemble: vocab has {vocab.size} ids but the tokenizer has {len(tokenizer)}")
        vocab.check_covers("large model", large_model.get_output_embeddings().weight.shape[0])
        vocab.check_covers("backpack", backpack.config.vocab_size)
        if isinstance(backpack, SenseHeadLM) and backpack.large is not large_model:
            ours, theirs = model_fingerprint(large_model), model_fingerprint(backpack.large)
            if ours != theirs:
                raise ValueError(
                    f"Ensemble: the sense head reads the hidden states of {backpack.config.context_model} "
                    f"({theirs}), not of this large model ({ours})"
                )
        self.vocab = vocab
        self.large = large_model.eval()
        self.backpack = backpack.eval()
        self.tokenizer = tokenizer
        self.window_keep = window_keep
        self.stats = DeltaStats()
        self.combined = CombinedEditsCache(backpack.config.n_embd)  # budget: serve sets packs.max_combined_bytes

    @property
    def context_limit(self) -> int:
        return model_context_limit(self.large)

    def large_fingerprint(self) -> str:
        return model_fingerprint(self.large)

    def new_batch(self) -> EnsembleBatch:
        return EnsembleBatch(self)

    def combined_edits(self, packs: list[PackRef]) -> tuple[PackKey, SenseEdits]:
        key = pack_key(packs)
        return key, self.combined.get(key, lambda: packs)

    # ------------------------------------------------------------------ reference paths

    def generate_greedy(
        self, prompts: list[list[int]], packs: list[list[PackRef]], max_new_tokens: int
    ) -> list[list[int]]:
        batch = self.new_batch()
        for i, (p, pk) in enumerate(zip(prompts, packs, strict=True)):
            batch.add(i, p, pk)
        out: list[list[int]] = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            nxt = batch.logprobs().argmax(dim=-1).tolist()
            for seq_id, t in zip(batch.seq_ids, nxt, strict=True):
                out[cast(int, seq_id)].append(t)
            batch.append(dict(zip(batch.seq_ids, nxt, strict=True)))
        return out

    @torch.no_grad()
    def score(
        self, prefixes: list[list[int]], continuations: list[list[int]], packs: list[list[PackRef]]
    ) -> list[torch.Tensor]:
        """Teacher-forced log-probs (float32) of each continuation token given prefix (+ earlier continuation)."""
        for i, (p, c) in enumerate(zip(prefixes, continuations, strict=True)):
            if not p or not c:
                raise ValueError(f"score: row {i} needs a non-empty prefix and continuation")
            if any(not 0 <= t < self.vocab.size for t in p + c):
                raise ValueError(
                    f"score: row {i} has a token id outside the tokenizer's vocabulary [0, {self.vocab.size})"
                )
        rows = [p + c for p, c in zip(prefixes, continuations, strict=True)]
        z_rows = full_logits(self.large, rows)
        results = []
        for row, z, p, c, pk in zip(rows, z_rows, prefixes, continuations, packs, strict=True):
            packed = self._packed_logits(row, z[:, : self.vocab.size], pk)
            if packed is None:  # past the Backpack's window: the serving path's sliding window, step by step
                results.append(self._score_incremental(p, c, pk))
                continue
            logp = torch.log_softmax(packed, dim=-1)
            targets = torch.tensor(c, device=logp.device)
            results.append(logp[len(p) - 1 : len(row) - 1].gather(1, targets[:, None]).squeeze(1))
        return results

    @torch.no_grad()
    def paired_nll(self, rows: list[list[int]], packs: list[PackRef]) -> tuple[list[float], list[float]]:
        """Summed NLL (nats) of tokens 1.. of each row under the base and under `packs`, paired.

        The large model's teacher-forced logits z are computed once per batch; the base scores
        log_softmax(z) and the packs log_softmax(z + E·δ) on the same z. A row with no edited token
        is an exact skip (pack NLL = base NLL); a row past the Backpack's window is scored with the
        serving path's sliding window.
        """
        for i, row in enumerate(rows):
            if len(row) < 2 or any(not 0 <= t < self.vocab.size for t in row):
                raise ValueError(f"paired_nll: row {i} needs 2 or more ids in [0, {self.vocab.size})")
        base_out, pack_out = [], []
        for row, z in zip(rows, full_logits(self.large, rows), strict=True):
            z = z[:, : self.vocab.size]
            targets = torch.tensor(row[1:], device=z.device)[:, None]
            base_nll = -float(torch.log_softmax(z[:-1], -1).gather(1, targets).double().sum())
            packed = self._packed_logits(row, z, packs)
            if packed is None:
                pack_nll = -float(self._score_incremental(row[:1], row[1:], packs).double().sum())
            elif packed is z:
                pack_nll = base_nll
            else:
                pack_nll = -float(torch.log_softmax(packed[:-1], -1).gather(1, targets).double().sum())
            base_out.append(base_nll)
            pack_out.append(pack_nll)
        return base_out, pack_out

    def _packed_logits(self, row: list[int], z: torch.Tensor, packs: list[PackRef]) -> torch.Tensor | None:
        """z + E·δ of a teacher-forced row (len, |U|): `z` itself when no token of the row is edited (exact
        skip), None when the row is longer than the Backpack's window (score it incrementally)."""
        _key, edits = self.combined_edits(packs)
        ids = torch.tensor([row], device=self.backpack.embedding.device)
        if not len(edits) or not bool(torch.isin(ids, edits.token_ids.to(ids.device)).any()):
            return z
        if len(row) > self.backpack.config.n_positions:
            return None
        alpha = self.backpack.contextualize(ids)
        delta = sequence_deltas(alpha, ids, edits.to(ids.device, alpha.dtype))[0]
        self.stats.backpack_calls += 1
        return z + logit_delta(delta, self.backpack.embedding, self.vocab.size).float().to(z.device)

    def _score_incremental(self, prefix: list[int], cont: list[int], packs: list[PackRef]) -> torch.Tensor:
        batch = self.new_batch()
        batch.add(0, prefix, packs)
        out = []
        for t in cont:
            out.append(batch.logprobs()[0, t])
            batch.append({0: t})
        return torch.stack(out)


@dataclass
class _Row:
    packs: list[PackRef]
    pending: list[int]  # tokens appended but not yet fed to the large model
    new: bool  # not yet (wholly) prefilled
    prompt: list[int]
    prefill_ids: list[int] | None = None  # what a chunked prefill is feeding (prompt + pending at its start)


class EnsembleBatch:
    """One decode batch with iteration-level membership (continuous batching)."""

    def __init__(self, ensemble: Ensemble):
        self.ens = ensemble
        self.deltas = DeltaTracker(
            ensemble.backpack, window_keep=ensemble.window_keep, stats=ensemble.stats, vocab_size=ensemble.vocab.size
        )
        self.large = LargeModelBatch(ensemble.large, want_hidden=self.deltas.uses_hidden)
        self._rows: dict[Hashable, _Row] = {}
        self._order: list[Hashable] = []  # large-model cache row order
        self._last_logits: torch.Tensor | None = None  # (b, V) aligned with _order

    @property
    def seq_ids(self) -> list[Hashable]:
        """Row order of the last `logprobs()`: the sequences whose prompt is in (a row still being prefilled
        in chunks has no next-token distribution yet)."""
        return list(self._order)

    @property
    def prefilling(self) -> list[Hashable]:
        """Sequences whose prompt is not (wholly) in the large model's cache yet, in join order."""
        return [s for s, r in self._rows.items() if r.new]

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, seq_id: Hashable, prompt_ids: list[int], packs: Sequence[PackRef] = ()) -> None:
        if seq_id in self._rows:
            raise KeyError(f"sequence {seq_id!r} is already in the batch")
        if not prompt_ids:
            raise ValueError("prompt_ids: empty")
        n = self.ens.vocab.size
        bad = next((i for i, t in enumerate(prompt_ids) if not 0 <= t < n), None)
        if bad is not None:
            raise ValueError(
                f"prompt_ids[{bad}]: token id {prompt_ids[bad]} outside the tokenizer's vocabulary [0, {n})"
            )
        packs = list(packs)
        key, edits = self.ens.combined_edits(packs)
        self.deltas.add(seq_id, prompt_ids, edits, key=key)
        self._rows[seq_id] = _Row(packs, [], True, list(prompt_ids))

    def remove(self, seq_id: Hashable) -> None:
        row = self._rows.pop(seq_id)
        self.deltas.remove(seq_id)
        if row.new:
            self.large.drop_partial(seq_id)
        else:
            keep = [i for i, s in enumerate(self._order) if s != seq_id]
            self._order = [self._order[i] for i in keep]
            self.large.select(keep)
            self._last_logits = self._last_logits[keep] if keep and self._last_logits is not None else None

    def append(self, tokens: dict[Hashable, int]) -> None:
        for seq_id, t in tokens.items():
            t = int(t)
            if not 0 <= t < self.ens.vocab.size:
                raise ValueError(f"token {t} for sequence {seq_id!r} is outside [0, {self.ens.vocab.size})")
            self._rows[seq_id].pending.append(t)
            self.deltas.append(seq_id, t)

    @torch.no_grad()
    def logprobs(self, budget: int | None = None) -> torch.Tensor:
        """Next-token log-probs over the shared vocabulary for every row, in `seq_ids` order: (b, |U|) float32.

        `budget`: the most prompt tokens this call prefills (chunked prefill). Rows already decoding take
        their step; new rows' prompts go in by chunks, in join order, and a row joins the output once its
        whole prompt is in. None: every new row whole, at once."""
        self._feed_pending()
        new = [s for s, r in self._rows.items() if r.new]
        if new and (budget is None or budget > 0):
            work, left = [], budget
            for s in new:
                row = self._rows[s]
                if row.prefill_ids is None:  # frozen at the first chunk
                    row.prefill_ids, row.pending = row.prompt + row.pending, []
                n = len(row.prefill_ids) - self.large.prefilling(s)
                if left is not None:
                    n = min(n, left)
                    left -= n
                if n > 0:
                    work.append((s, row.prefill_ids, n))
            finished = self.large.prefill_chunks(work)
            ended = {key: (z, h) for key, z, h in finished}
            if self.deltas.uses_hidden:  # in position order: each row's chunks arrive in sequence
                for s, _, _ in work:
                    h = ended[s][1] if s in ended else self.large.chunk_hidden.pop(s, None)
                    if h is not None:
                        self.deltas.add_hidden(s, h)
            done = [key for key, _, _ in finished]
            for s in done:
                self._rows[s].new, self._rows[s].prefill_ids = False, None
            if done:
                self._order += done
                logits = torch.stack([ended[s][0] for s in done])
                self._last_logits = logits if self._last_logits is None else torch.cat([self._last_logits, logits])
        if not self._order or self._last_logits is None:
            return torch.zeros(0, self.ens.vocab.size)
        z = self._last_logits[:, : self.ens.vocab.size]
        logp = torch.log_softmax(z, dim=-1)
        delta, active = self.deltas.logit_deltas(self._order)
        if bool(active.any()):
            idx = active.nonzero().flatten()
            logp[idx] = torch.log_softmax(z[idx] + delta[idx].float().to(z.device), dim=-1)
        return logp

    def _feed_pending(self) -> None:
        """Step the large model until every cached row has consumed its appended tokens."""
        rows = [self._rows[s] for s in self._order]
        while any(r.pending for r in rows):
            advance = torch.tensor([bool(r.pending) for r in rows], device=self.large.model.device)
            tokens = torch.tensor([r.pending[0] if r.pending else 0 for r in rows], device=self.large.model.device)
            logits = self.large.step(tokens, advance)
            if self.large.step_hidden is not None:
                for i in advance.nonzero().flatten().tolist():
                    self.deltas.add_hidden(self._order[i], self.large.step_hidden[i : i + 1])
            self._last_logits = (
                logits if self._last_logits is None else torch.where(advance[:, None], logits, self._last_logits)
            )
            for r in rows:
                if r.pending:
                    r.pending.pop(0)
