"""EnsembleLogitsCore: the one piece of ensemble logic both vLLM shims share.

It maps vLLM's batch rows (V1: persistent-batch indices; V2: request slots) to sequences of an
``ensemble.delta.DeltaTracker`` (per-sequence incremental Backpack state with exact skip) and
adds β·E·δ to the logits in place:

    logits[rows, :|U|] += deltas          (one batched op on the logits' device)
    logits[:, |U|:]     = -inf            (never sample an id outside the tokenizer, base rows included)

U = [0, vocab_size) is the tokenizer's vocabulary (50257 for GPT-2; the large model may have more rows).

Rows whose request carries no edited token get exact zeros (the tracker's exact skip), and when
*no* tracked row is active the logits are not touched at all beyond the padding mask, so base
rows are bit-identical to the large model restricted to the shared vocabulary.

Bookkeeping (V1 ``BatchUpdate`` semantics, processed in the order removed, added, moved):
  removed i         -> the row's sequence leaves the batch. vLLM also removes requests it does not
                       schedule in a step (and preempted ones) and adds them back later, so a request
                       that carries a ``request_id`` and has not visibly finished (max_tokens reached,
                       a stop / EOS token last) is *parked*: the tracker suspends its Backpack state
                       (no work while parked) under that id; at most ``max_parked`` are kept, the
                       least recently parked evicted first
  added (i, ...)    -> a previous occupant of row i leaves; a parked request with the same id, packs
                       and prompt resumes its state (no Backpack prefill; ``stats.resumed``), otherwise
                       a fresh tracker sequence is created from the prompt ids (a re-added request
                       arrives with a non-empty output list: its tokens are synced at the next apply)
  moved a->b (UNI)  -> b's occupant (if any) leaves (implied finish), a's state moves to b
  moved a<->b SWAP  -> the two states swap
No tracker work happens on a move or swap. Output tokens are read from vLLM's live lists in
``sync`` (called from ``apply``: under async scheduling the lists hold -1 placeholders during
``update_state`` and are only final when the sampler runs).

Forced scoring (a request whose extra_args carry ``score``, serve.vllm.scoring): at its k-th sampled
position the row's raw logits z give

    base_k   = z[t_k] - logsumexp(z[:|U|])                 (before the delta)
    packed_k = z'[t_k] - logsumexp(z'[:|U|]),  z' = z + β·E·δ  (after it; == base_k without an edited token)

with t_k = score.tokens[k], recorded under the request id; then every other id is masked, so the
sampler (greedy) picks t_k and the next step scores position k + 1: teacher forcing on the serving
path, in bounded memory, batched with generation. Records are written by index (a partial prefill
chunk's bogus row is overwritten by the real one; a re-added request continues the same record),
taken by the server once vLLM reports the request finished (`take_scores`), and bounded
(``max_scores``, oldest first). Score rows without an edited pack have no tracker sequence.

This module imports no vLLM: the bookkeeping is unit-tested in the main CI against a stand-in of
``BatchUpdate`` (and against vLLM's own types where vLLM is installed).
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ensemble.delta import DeltaTracker
from ensemble.edits import CombinedEditsCache, PackRef, SenseEdits
from serve.scoring import top_of

from .args import RequestPacks, ScoreSpec

if TYPE_CHECKING:
    from ensemble.backpack import BackpackLM

    from .resolver import EditsSource

log = logging.getLogger("sensepack.vllm")


@dataclass
class _Row:
    sid: int | None  # tracker sequence id (unique per add; rows are recycled); None: a score row without edits
    output_ids: list | None  # vLLM's live output-token list (V1), None for V2 (tokens pushed)
    seen: int = 0  # output tokens already fed to the tracker
    key: tuple = ()
    rid: str | None = None  # extra_args request_id: parks across vLLM's remove / re-add
    prompt_len: int = 0
    last: int | None = None  # the last output token fed (a re-add must continue the same output)
    max_tokens: int | None = None
    stop_ids: frozenset = frozenset()
    score: ScoreSpec | None = None  # forced scoring: record and force score.tokens


@dataclass
class _ScoreRecord:
    base: list  # per continuation position: a 0-dim tensor on the logits' device, None until recorded
    packed: list
    top: list | None = None  # with score.top_n: per position (rank, top ids, top log-probs) of the packed row


@dataclass
class CoreStats:
    applies: int = 0  # apply() calls
    skipped: int = 0  # apply() calls that left the shared-vocab logits untouched
    delta_applies: int = 0  # apply() calls that added a delta
    rows_added: int = 0
    prompt_missing: int = 0  # requests with prompt embeddings (no ids): served by the base model
    pack_unavailable: int = 0  # pinned pack not found by the resolver (must stay 0)
    parked: int = 0  # removed unfinished requests whose Backpack state was kept
    resumed: int = 0  # re-added requests that got their state back (no Backpack prefill)
    parked_evicted: int = 0  # parked states dropped for room (max_parked) or a mismatching re-add
    scored_positions: int = 0  # forced-scoring positions recorded
    scores_evicted: int = 0  # score records dropped for room (max_scores) before the server took them
    score_refused: int = 0  # forced-scoring requests with an id outside U (never forced; the server sees no record)


@dataclass
class EnsembleLogitsCore:
    backpack: BackpackLM
    source: EditsSource
    vocab_size: int = field(kw_only=True)  # |U| (ensemble.vocab.Vocabulary.size): ids >= it are masked
    window_keep: int | None = None
    mask_padding: bool = True
    max_combined_bytes: int = 256 << 20  # combined pack sets kept (LRU): packs.max_combined_bytes
    max_parked: int = 64  # Backpack states kept across vLLM's remove / re-add (bounded)
    max_scores: int = 1024  # forced-scoring records not yet taken by the server (bounded)
    stats: CoreStats = field(default_factory=CoreStats)

    def __post_init__(self) -> None:
        self.tracker = DeltaTracker(self.backpack, window_keep=self.window_keep, vocab_size=self.vocab_size)
        self.d = self.backpack.config.n_embd
        self.rows: dict[int, _Row] = {}
        self._sids = itertools.count()
        self._combined = CombinedEditsCache(self.d, self.max_combined_bytes)
        self._parked: OrderedDict[str, _Row] = OrderedDict()  # request_id -> suspended row
        # Backpack seconds of each apply where the Backpack ran (drained by serve.vllm.worker; bounded)
        self.step_seconds: deque = deque(maxlen=4096)
        self._gone: OrderedDict[str, int] = OrderedDict()  # finished ids still in the batch: never park
        self._layout = None  # cached (rows, sids, index tensor or None, dense count)
        self._scores: OrderedDict[str, _ScoreRecord] = OrderedDict()  # request_id -> forced-scoring record
        self._forced = 0  # rows with a score spec (0: apply never looks for them)

    # ------------------------------------------------------------ packs
    def edits_for(self, req: RequestPacks) -> tuple[tuple, SenseEdits]:
        key = req.key
        return key, self._combined.get(
            key, lambda: [PackRef(p.name, p.version, self.source.edits(p.name, p.version), p.beta) for p in req.packs]
        )

    # ------------------------------------------------------------ bookkeeping
    def add(self, row: int, req: RequestPacks | None, prompt_ids, output_ids: list | None, params=None) -> bool:
        """A request enters `row` (replacing any previous occupant); True when it may edit logits.
        `params` (vllm.SamplingParams) tells when a removed request has visibly finished."""
        self.drop(row)
        if req is None:
            return False
        if req.request_id is not None and req.request_id in self._parked:
            r = self._parked.pop(req.request_id)
            if self._resumable(r, req, prompt_ids, output_ids):
                r.output_ids = output_ids
                self.rows[row] = r
                self._forced += r.score is not None
                self.stats.resumed += 1
                self._layout = None
                return True
            if r.sid is not None:
                self.tracker.remove(r.sid)  # same id, different request (or output): start afresh
            self.stats.parked_evicted += 1
        if prompt_ids is None:
            self.stats.prompt_missing += 1
            log.warning(
                "sensepack: request without prompt token ids (prompt embeddings) is served by the base model",
                extra={"event": "vllm_prompt_embeds"},
            )
            return False
        try:
            key, edits = self.edits_for(req)
        except KeyError as e:  # resolver.PackUnavailable: the server pins before submitting
            self.stats.pack_unavailable += 1
            log.error(
                "sensepack: pinned pack unavailable in the processor; row served by the base model: %s",
                e,
                extra={"event": "vllm_pack_unavailable"},
            )
            return False
        if len(edits) == 0 and req.score is None:
            return False
        if req.score is not None and max(req.score.tokens) >= self.vocab_size:
            # forcing an id outside U would index past the logits; the server validates ids, so this is a bug
            self.stats.score_refused += 1
            log.error(
                "sensepack: forced-scoring request with a token id >= |U| (%d); not scored",
                self.vocab_size,
                extra={"event": "vllm_score_refused"},
            )
            return False
        sid = None
        if len(edits):
            sid = next(self._sids)
            self.tracker.add(sid, list(prompt_ids), edits, key=key)
        if req.score is not None and req.request_id is not None:
            self._open_record(req.request_id, len(req.score.tokens), req.score.top_n is not None)
        stop_ids = getattr(params, "all_stop_token_ids", None) or getattr(params, "stop_token_ids", None) or ()
        self.rows[row] = _Row(
            sid,
            output_ids,
            0,
            key,
            rid=req.request_id,
            prompt_len=len(prompt_ids),
            max_tokens=getattr(params, "max_tokens", None),
            stop_ids=frozenset(stop_ids),
            score=req.score,
        )
        self._forced += req.score is not None
        self.stats.rows_added += 1
        self._layout = None
        return True

    def _open_record(self, rid: str, n: int, top: bool = False) -> None:
        """The record a forced-scoring request writes to (kept across its re-adds: written by index)."""
        if rid in self._scores:
            return
        self._scores[rid] = _ScoreRecord([None] * n, [None] * n, [None] * n if top else None)
        while len(self._scores) > self.max_scores:
            self._scores.popitem(last=False)
            self.stats.scores_evicted += 1

    def take_scores(self, request_ids) -> dict:
        """The records of finished forced-scoring requests, removed: {id: {"base": [...], "packed": [...]}}
        (float log-probs per continuation token) or {id: {"error": ...}} when a position was never
        recorded. Ids this core never saw (another engine's, or evicted) are left out."""
        out: dict = {}
        for rid in request_ids:
            rec = self._scores.pop(rid, None)
            if rec is None:
                continue
            missing = sum(v is None for v in rec.base)
            if missing:
                out[rid] = {"error": f"{missing} of {len(rec.base)} continuation positions were not scored"}
                continue
            out[rid] = {
                "base": torch.stack(rec.base).double().tolist(),
                "packed": torch.stack(rec.packed).double().tolist(),
            }
            if rec.top is not None:
                out[rid]["top"] = [(int(r), ids.tolist(), lps.double().tolist()) for r, ids, lps in rec.top]
        return out

    @staticmethod
    def _resumable(r: _Row, req: RequestPacks, prompt_ids, output_ids) -> bool:
        if r.key != req.key or r.prompt_len != len(prompt_ids):
            return False
        if r.output_ids is None or output_ids is None:  # V2 pushes tokens: no list to continue
            return r.output_ids is None and output_ids is None
        return len(output_ids) >= r.seen and (r.seen == 0 or output_ids[r.seen - 1] == r.last)

    def _finished(self, r: _Row) -> bool:
        """Visibly done (its state will not be needed again): max_tokens reached or a stop / EOS token last."""
        out = r.output_ids
        if out is None:
            return False
        n = len(out)
        return (r.max_tokens is not None and n >= r.max_tokens) or (n > 0 and out[-1] in r.stop_ids)

    def drop(self, row: int, park: bool = False) -> None:
        """`row` leaves the batch; with `park`, an unfinished request with an id keeps its suspended state."""
        r = self.rows.pop(row, None)
        if r is None:
            return
        self._layout = None
        self._forced -= r.score is not None
        gone = r.rid is not None and self._gone.pop(r.rid, None) is not None  # the server saw it finish
        if r.sid is None:  # a score row without edits: no Backpack state (its record is kept by id)
            return
        if park and r.rid is not None and self.max_parked > 0 and not gone and not self._finished(r):
            self.tracker.suspend(r.sid)
            old = self._parked.pop(r.rid, None)
            if old is not None:
                self.tracker.remove(old.sid)
            self._parked[r.rid] = r
            self.stats.parked += 1
            while len(self._parked) > self.max_parked:
                _, victim = self._parked.popitem(last=False)
                self.tracker.remove(victim.sid)
                self.stats.parked_evicted += 1
            return
        self.tracker.remove(r.sid)

    def forget(self, request_id: str) -> bool:
        """The request finished (the server says so): drop its parked state (True when there was one), or
        make sure it is not parked when vLLM removes it later (an aborted request leaves the batch a step
        after the abort)."""
        self._scores.pop(request_id, None)  # an abandoned score's record (a taken one is gone already)
        r = self._parked.pop(request_id, None)
        if r is not None:
            if r.sid is not None:
                self.tracker.remove(r.sid)
            return True
        if any(row.rid == request_id for row in self.rows.values()):
            self._gone[request_id] = 1
            while len(self._gone) > 4 * self.max_parked + 64:  # bounded; an old entry only costs a park
                self._gone.popitem(last=False)
        return False

    @property
    def parked(self) -> int:
        return len(self._parked)

    def move(self, a: int, b: int) -> None:
        """One-way a -> b: b's previous occupant is gone (implied finish)."""
        self.drop(b)
        r = self.rows.pop(a, None)
        if r is not None:
            self.rows[b] = r
            self._layout = None

    def swap(self, a: int, b: int) -> None:
        ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
        if ra is not None:
            self.rows[b] = ra
        if rb is not None:
            self.rows[a] = rb
        if ra is not None or rb is not None:
            self._layout = None

    def update(self, batch_update, parse) -> None:
        """Apply a V1 ``BatchUpdate`` (or a stand-in with .removed/.added/.moved); `parse(params)`
        gives the request's RequestPacks or None."""
        if not batch_update:
            return
        for i in batch_update.removed:
            self.drop(i, park=True)
        for i, params, prompt_ids, output_ids in batch_update.added:
            self.add(i, parse(params), prompt_ids, output_ids, params)
        for a, b, direction in batch_update.moved:
            if getattr(direction, "name", direction) == "SWAP":
                self.swap(a, b)
            else:
                self.move(a, b)

    def push_tokens(self, row: int, tokens) -> None:
        """V2: feed tokens read from the runner's history (no live list to read)."""
        r = self.rows[row]
        for t in tokens:
            if r.sid is not None:
                self.tracker.append(r.sid, int(t))
            r.seen += 1
            r.last = int(t)

    def sync(self) -> None:
        """V1: feed the tokens appended to each live output list since the last apply.

        This loop is the only per-row Python in apply and it is unavoidable: vLLM hands the
        processor Python lists. A negative id is an async-scheduling placeholder: stop there.
        """
        append = self.tracker.append
        for r in self.rows.values():
            out = r.output_ids
            if out is None:
                continue
            n = len(out)
            while r.seen < n:
                t = out[r.seen]
                if t < 0:
                    break
                if r.sid is not None:
                    append(r.sid, t)
                r.seen += 1
                r.last = t

    # ------------------------------------------------------------ the step
    def _rows_layout(self, device):
        if self._layout is None or self._layout[3] != device:
            rows = sorted(i for i, r in self.rows.items() if r.sid is not None)
            sids = [self.rows[i].sid for i in rows]
            dense = rows == list(range(len(rows)))
            index = None if dense else torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
            self._layout = (rows, sids, index, device)
        return self._layout

    @torch.no_grad()
    def add_deltas(
        self,
        logits: torch.Tensor,
        rows: list[int] | None = None,
        sids: list[int] | None = None,
        index: torch.Tensor | None = None,
        forced: list[tuple[int, _Row, int]] | None = None,
    ) -> torch.Tensor:
        """logits[rows, :|U|] += E·δ (in place, one op); logits[:, |U|:] = -inf; forced-scoring rows
        recorded and forced.

        Default rows: every tracked row (V1, rows are logits rows); default `forced`: every score row
        at position len(output). V2 passes its own (logits rows, tracker ids, index tensor, forced
        (logits row, row, position)) for this step's order.
        """
        self.stats.applies += 1
        n = self.vocab_size
        if self.mask_padding and logits.shape[-1] > n:
            logits[:, n:] = float("-inf")
        if forced is None:
            forced = self._forced_rows(logits.shape[0]) if self._forced else []
        forced = [f for f in forced if 0 <= f[2] < len(f[1].score.tokens)] if forced else []  # type: ignore[union-attr]
        raw = None
        if forced:  # the raw rows (before the delta) for the base log-probs: a (k, |U|) copy
            at = torch.tensor([i for i, _, _ in forced], dtype=torch.long).to(logits.device, non_blocking=True)
            raw = logits[at, :n].float()
        self._add(logits, rows, sids, index)
        if raw is not None:
            self._force(logits, forced, at, raw)
        return logits

    def _forced_rows(self, n_rows: int) -> list[tuple[int, _Row, int]]:
        """V1: (logits row, row, continuation position) of every score row in this step's logits."""
        return [
            (i, r, len(r.output_ids))
            for i, r in self.rows.items()
            if r.score is not None and r.output_ids is not None and i < n_rows
        ]

    def _force(self, logits: torch.Tensor, forced, at: torch.Tensor, raw: torch.Tensor) -> None:
        """Record base (raw) and packed (after the delta) log-probs of each forced token; mask the rest."""
        n = self.vocab_size
        dev = logits.device
        tgt = torch.tensor([r.score.tokens[k] for _, r, k in forced], dtype=torch.long).to(dev, non_blocking=True)
        edited = logits[at, :n].float()
        base = raw.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(raw, dim=-1)
        packed = edited.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(edited, dim=-1)
        for m, (_, r, k) in enumerate(forced):
            rec = self._scores.get(r.rid) if r.rid is not None else None
            if rec is not None:
                rec.base[k], rec.packed[k] = base[m], packed[m]
                if rec.top is not None:  # the served (packed) row's rank and top tokens, as the embedded scorer
                    lp = (edited[m] - torch.logsumexp(edited[m], dim=-1))[None]
                    ranks, ids, lps = top_of(lp, tgt[m : m + 1], r.score.top_n or 0)  # type: ignore[union-attr]
                    rec.top[k] = (ranks[0], ids[0], lps[0])
                self.stats.scored_positions += 1
        logits[at] = float("-inf")
        logits[at, tgt] = 0.0

    def _add(
        self,
        logits: torch.Tensor,
        rows: list[int] | None,
        sids: list[int] | None,
        index: torch.Tensor | None,
    ) -> None:
        n = self.vocab_size
        if rows is None:
            if not self.rows:
                self.stats.skipped += 1
                return
            rows, sids, index, _ = self._rows_layout(logits.device)
            if rows and rows[-1] >= logits.shape[0]:  # defensive: a tracked row beyond this step's logits
                keep = [k for k, r in enumerate(rows) if r < logits.shape[0]]
                rows, sids = [rows[k] for k in keep], [sids[k] for k in keep]
                index = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        if not sids:
            self.stats.skipped += 1
            return
        st = self.tracker.stats
        before, secs = st.exact_skip_rows, st.backpack_seconds
        deltas, _active = self.tracker.logit_deltas(sids)
        if st.exact_skip_rows - before == len(sids):  # no row carries an edited token: exact skip
            self.stats.skipped += 1
            return
        self.step_seconds.append(st.backpack_seconds - secs)
        deltas = deltas.to(device=logits.device, dtype=logits.dtype, non_blocking=True)
        if index is None:  # rows are 0..n-1
            logits[: len(sids), :n] += deltas
        else:
            logits[:, :n].index_add_(0, index, deltas)
        self.stats.delta_applies += 1
