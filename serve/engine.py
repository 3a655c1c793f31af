"""The embedded engine: transformers models in-process, iteration-level batching.

One scheduler thread owns the ensemble core's batch session and does all model
work (decode steps, Score jobs, gate and A/B re-scoring jobs), so the core is
never entered from two threads. Each loop iteration:

1. drops cancelled / deadline-exceeded requests (their slot is freed at once),
2. admits waiting requests while running slots are free (they join the batch
   at this step: `session.add` prefills them inside the next `logprobs()`),
3. runs one decode step for every running row: `session.logprobs()` gives the
   next-token log-probs over the shared ids U (the tokenizer's; ensemble rows with the
   Backpack delta, exact-skip rows bit-identical to the base), the batched
   sampler (serve.sampler) picks every row's token at once (greedy /
   temperature / top-k / top-p, each row drawing from its own
   `torch.Generator`), `session.append` feeds the tokens, finished requests
   leave the batch,
4. runs queued jobs: high priority (Score RPCs) every iteration, low priority
   (A/B re-scoring, gate batches) when idle or every `lane_every_steps` steps.

Requests talk to the servicer through a per-request `queue.Queue` of events.

Fault isolation: a failure that belongs to one request (refused by the core at
admission, sampling its row, detokenising its text) ends that request alone
with ERROR; only a failure of the shared model step ends the whole batch.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ensemble.vocab import Vocabulary
from serve.detok import IncrementalDetokenizer
from serve.errors import QueueFull, Unavailable
from serve.params import GenerationRequest
from serve.sampler import RowParams, Sampled, sample

log = logging.getLogger("sensepack.engine")

# finish reasons (mirror proto StopReason names)
MAX_TOKENS, EOS_TOKEN, STOP_SEQUENCE, CANCELLED, TIME_LIMIT, ERROR = (
    "MAX_TOKENS", "EOS_TOKEN", "STOP_SEQUENCE", "CANCELLED", "TIME_LIMIT", "ERROR")
STOP_TOKEN = "STOP_TOKEN"     # a token of stopping.stop_token_ids
REFUSED = "REFUSED"          # the engine refused the request at admission (InvalidRequest; proto ERROR)
SHUTDOWN = "SHUTDOWN"        # cut by a shutdown that outlived the grace period (Unavailable; proto CANCELLED)
_NO_TEXT = (CANCELLED, TIME_LIMIT, ERROR, REFUSED, SHUTDOWN)


@dataclass
class TokenEvent:
    token_id: int
    text_delta: str
    logprob: float | None
    top: list[tuple[int, float]]
    generated: int


@dataclass
class FinishEvent:
    reason: str
    text: str                     # the whole generated text (stop sequence handled)
    text_delta: str               # text not yet sent in TokenEvents
    output_ids: list[int]
    stop_sequence: str = ""
    error: str = ""
    last: TokenEvent | None = None   # the final generated token, when generation ended normally


@dataclass
class Sequence:
    seq_id: int
    req: GenerationRequest
    packs: list                   # list[PackRef] pinned at admission (β applied)
    events: "queue.Queue"
    on_finish: Callable[["Sequence", str], None] | None = None
    deadline: float | None = None  # time.monotonic()
    arrival: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    seed: int | None = None
    output_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0
    detok: IncrementalDetokenizer | None = None
    stop_scan: int = 0            # stop sequences were searched (without a match) before this character
    admitted: float | None = None
    last_token: float | None = None
    cancel_reason: str | None = None
    finished: str | None = None
    user: object = None           # servicer's bookkeeping (pins, arms)

    def cancel(self, reason: str = CANCELLED) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class EngineStopped(Unavailable):
    def __init__(self, field_name: str = "", message: str = "server is shutting down"):
        super().__init__(field_name, message)


class Engine:
    log_name = "engine"

    def __init__(self, ensemble, tokenizer, limits, metrics, lane_every_steps: int = 8):
        self.ensemble = ensemble
        self.tokenizer = tokenizer
        # EOS and the sampling range come from the served pairing (vLLM without an ensemble: its tokenizer).
        self.vocab: Vocabulary = ensemble.vocab if ensemble is not None else Vocabulary.from_tokenizer(tokenizer)
        self.limits = limits
        self.metrics = metrics
        self.lane_every_steps = lane_every_steps
        self._cond = threading.Condition()
        self._waiting: list[Sequence] = []
        self._running: dict[int, Sequence] = {}
        self._admitting = 0          # taken off _waiting, not yet in _running (counted as running)
        self._scoring = 0            # Score RPCs in progress (they share the request cap)
        self._score_tokens = 0       # their token budgets (prefix + longest continuation each)
        self._high: list[tuple[Callable, Future]] = []
        self._low: list[tuple[Callable, Future]] = []
        self._ids = itertools.count(1)
        self._accepting = True
        self._stop = False
        self._steps = 0
        self._session = None
        self._thread: threading.Thread | None = None
        self.decode_steps = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._session = self.ensemble.new_batch()
        self._thread = threading.Thread(target=self._loop, name="sensepack-engine", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False
            self._cond.notify_all()

    def drain(self, timeout: float | None) -> bool:
        """Wait until no request is running or waiting; True when drained."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._waiting or self._running:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.05) if left is not None else 0.05)
        return True

    def stop(self, drain_timeout: float | None = 0.0) -> None:
        self.stop_accepting()
        if drain_timeout:
            self.drain(drain_timeout)
        with self._cond:
            for seq in list(self._waiting) + list(self._running.values()):
                seq.cancel(CANCELLED)
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._cond:
            for fn, fut in self._high + self._low:
                if not fut.done():
                    fut.set_exception(EngineStopped())
            self._high.clear()
            self._low.clear()

    # ------------------------------------------------------------ public API
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def scoring(self) -> int:
        return self._scoring

    def submit(self, req: GenerationRequest, packs: list, deadline: float | None = None,
               on_finish=None, user=None) -> Sequence:
        seed = req.seed
        gen = None
        if not req.greedy:
            if seed is None:
                seed = int.from_bytes(os.urandom(7), "little")
            gen = torch.Generator().manual_seed(seed)
        seq = Sequence(next(self._ids), req, packs, queue.Queue(), on_finish, deadline,
                       generator=gen, seed=seed, user=user)
        with self._cond:
            self._check_room()
            self._waiting.append(seq)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify_all()
        return seq

    def _check_room(self) -> None:
        """Refuse a new request when the queue is full (caller holds _cond)."""
        if not self._accepting:
            raise EngineStopped()
        running = len(self._running) + self._admitting
        cap = self.limits.max_running + self.limits.max_waiting
        if running + len(self._waiting) + self._scoring >= cap:
            raise QueueFull("", f"queue full: {running} running, {len(self._waiting)} waiting, "
                            f"{self._scoring} scoring (limits.max_running={self.limits.max_running}, "
                            f"limits.max_waiting={self.limits.max_waiting})")

    def begin_score(self, tokens: int = 0) -> None:
        """Count a Score RPC against the request cap, and its `tokens` (the most it holds at once)
        against limits.max_batched_tokens, until `end_score(tokens)` (RESOURCE_EXHAUSTED when full)."""
        with self._cond:
            self._check_room()
            self._scoring += 1
            self._score_tokens += tokens

    def end_score(self, tokens: int = 0) -> None:
        with self._cond:
            self._scoring -= 1
            self._score_tokens -= tokens
            self._cond.notify_all()

    def cut(self, reason: str = SHUTDOWN) -> None:
        """End every waiting and running request with `reason` (at the next loop iteration)."""
        with self._cond:
            for seq in list(self._waiting) + list(self._running.values()):
                seq.cancel(reason)
            self._cond.notify_all()

    def cancel(self, seq: Sequence, reason: str = CANCELLED) -> None:
        with self._cond:
            seq.cancel(reason)
            self._cond.notify_all()

    def run_job(self, fn: Callable, high: bool = True) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._stop:
                fut.set_exception(EngineStopped())
                return fut
            (self._high if high else self._low).append((fn, fut))
            self._cond.notify_all()
        return fut

    def pending_low(self) -> int:
        return len(self._low)

    # ------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._waiting or self._running or self._high or self._low):
                    self._cond.wait()
                if self._stop:
                    leftovers = list(self._waiting) + list(self._running.values())
                    self._waiting.clear()
                else:
                    leftovers = None
            if leftovers is not None:
                for seq in leftovers:
                    self._finish(seq, seq.cancel_reason or CANCELLED)
                return
            try:
                self._reap()
                self._admit()
                if self._running:
                    self._step()
                self._run_jobs()
            except Exception as e:  # the engine must survive one bad step
                log.exception(f"{self.log_name} step failed", extra={"event": "engine_error"})
                for seq in list(self._running.values()):
                    self._finish(seq, ERROR, error=f"{type(e).__name__}: {e}")
                self._recover()

    def _recover(self) -> None:
        """After a failed step every running request has been finished: start from an empty batch."""
        self._session = self.ensemble.new_batch()

    def _reap(self) -> None:
        now = time.monotonic()
        with self._cond:
            for seq in list(self._waiting):
                if seq.deadline is not None and now >= seq.deadline:
                    seq.cancel(TIME_LIMIT)
                if seq.cancel_reason:
                    self._waiting.remove(seq)
                    self.metrics.waiting.set(len(self._waiting))
                    self._finish(seq, seq.cancel_reason, admitted=False)
        for seq in list(self._running.values()):
            if seq.deadline is not None and now >= seq.deadline:
                seq.cancel(TIME_LIMIT)
            if seq.cancel_reason:
                self._finish(seq, seq.cancel_reason)

    @staticmethod
    def _budget(seq: Sequence) -> int:
        """Tokens a request may hold in the batch: its prompt and every token it may generate."""
        return len(seq.req.prompt_ids) + seq.req.max_new_tokens

    def _admit(self) -> None:
        """FIFO admission while a running slot is free and, with limits.max_batched_tokens, the running
        requests' token budgets (prompt + max_new_tokens) leave room for the next one."""
        budget = self.limits.max_batched_tokens
        with self._cond:
            room = self.limits.max_running - len(self._running)
            new = self._waiting[:max(room, 0)]
            if budget is not None:
                used = self._score_tokens + sum(self._budget(s) for s in self._running.values())
                for k, seq in enumerate(new):
                    used += self._budget(seq)
                    if used > budget and (k or self._running or self._score_tokens):   # alone it fits (parse)
                        new = new[:k]
                        break
            del self._waiting[:len(new)]
            self._admitting = len(new)
            self.metrics.waiting.set(len(self._waiting))
        try:
            self._admit_new(new)
        finally:
            with self._cond:
                self._admitting = 0

    def _admit_new(self, new: list[Sequence]) -> None:
        now = time.monotonic()
        for seq in new:
            try:
                self._session.add(seq.seq_id, list(seq.req.prompt_ids), list(seq.packs))
            except Exception as e:   # refused by the core (e.g. invalid edits): this request only
                log.exception("request refused by the core", extra={"event": "engine_add_failed"})
                self._finish(seq, ERROR, error=f"{type(e).__name__}: {e}", admitted=False)
                continue
            seq.admitted = now
            self._running[seq.seq_id] = seq
            self.metrics.queue_time.observe(now - seq.arrival)
            self.metrics.prompt_tokens.inc(len(seq.req.prompt_ids))
        self.metrics.running.set(len(self._running))

    def _core_stats(self) -> tuple[int, int, float]:
        st = self.ensemble.stats
        return st.exact_skip_rows, st.window_reprefills, st.backpack_seconds

    def _sync_core_stats(self, before: tuple[int, int, float]) -> None:
        """Export the core's counters for this step (row-steps skipped, window re-prefills, Backpack time)."""
        skip, rep, secs = self._core_stats()
        if skip > before[0]:
            self.metrics.exact_skip_steps.inc(skip - before[0])
        if rep > before[1]:
            self.metrics.window_reprefills.inc(rep - before[1])
        if secs > before[2]:      # observed only for steps where the Backpack ran (others are exact skips)
            self.metrics.backpack_step.observe(secs - before[2])

    def _row_params(self, seq: Sequence) -> RowParams:
        req = seq.req
        return RowParams(greedy=req.greedy, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                         mask_eos=len(seq.output_ids) < req.min_new_tokens and not req.ignore_eos,
                         generator=seq.generator, want_logprob=req.want_logprobs, top_n=req.top_n,
                         min_p=req.min_p, logit_bias=req.logit_bias, repetition_penalty=req.repetition_penalty,
                         presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                         prompt_ids=req.prompt_ids if req.penalized else None,
                         output_ids=seq.output_ids if req.penalized else None, stop_token_ids=req.stop_token_ids,
                         mask_stop_ids=len(seq.output_ids) < req.min_new_tokens)

    def _sample(self, lp: torch.Tensor, seqs: list[Sequence]) -> dict[int, Sampled]:
        """Sample every row together; when that fails, row by row, ending only the rows that fail."""
        params = [self._row_params(s) for s in seqs]
        try:
            return {s.seq_id: out for s, out in zip(seqs, sample(lp, params, self.vocab.eos_id))}
        except Exception:   # find the faulty row(s): the batch must not pay for one request
            log.warning("batched sampling failed; sampling row by row", extra={"event": "sampler_fallback"})
        chosen = {}
        for r, (seq, p) in enumerate(zip(seqs, params)):
            try:
                chosen[seq.seq_id] = sample(lp[r:r + 1], [p], self.vocab.eos_id)[0]
            except Exception as e:  # noqa: BLE001 - this request alone ends
                log.exception("sampling failed for one request", extra={"event": "request_error",
                                                                         "request_id": seq.req.request_id})
                self._finish(seq, ERROR, error=f"sampling failed: {_describe(e)}")
        return chosen

    def _step(self) -> None:
        before = self._core_stats()
        lp = self._session.logprobs()
        rows = list(self._session.seq_ids)
        self._sync_core_stats(before)
        self.decode_steps += 1
        self._steps += 1
        live = [(r, self._running[sid]) for r, sid in enumerate(rows) if sid in self._running]
        if not live:
            return
        chosen = self._sample(lp[[r for r, _ in live]], [s for _, s in live])
        self._session.append({sid: out.token for sid, out in chosen.items()})
        now = time.monotonic()
        for sid, out in chosen.items():
            seq = self._running[sid]
            try:
                self._accept(seq, out.token, out.logprob, out.top, now)
            except Exception as e:  # noqa: BLE001 - e.g. detokenising: this request alone ends
                log.exception("accepting a token failed", extra={"event": "request_error",
                                                                  "request_id": seq.req.request_id})
                self._finish(seq, ERROR, error=f"{_describe(e)}")

    def _holdback(self, text: str, stops: list[str]) -> int:
        keep = 0
        if text.endswith("\ufffd"):
            keep = len(text) - len(text.rstrip("\ufffd"))
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        return keep

    def _accept(self, seq: Sequence, tok: int, logprob, top, now: float) -> None:
        req = seq.req
        seq.output_ids.append(tok)
        n = len(seq.output_ids)
        if seq.last_token is None:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token)
        seq.last_token = now
        self.metrics.generation_tokens.inc()

        reason, stop_seq, final_text = None, "", None
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer(self.tokenizer)
        seq.detok.add(tok)
        text = seq.detok.text           # complete characters only; an unfinished one is held back
        if tok == self.vocab.eos_id and not req.ignore_eos and n > req.min_new_tokens - 1:
            reason = EOS_TOKEN
        elif tok in req.stop_token_ids and n >= req.min_new_tokens:
            reason = STOP_TOKEN
        if req.stop_sequences and n >= req.min_new_tokens:
            best = None
            for s in req.stop_sequences:    # only the text not searched yet (plus a stop's length of overlap)
                p = text.find(s, max(0, seq.stop_scan - len(s) + 1))
                if p >= 0 and (best is None or p < best[0]):
                    best = (p, s)
            seq.stop_scan = len(text)
            if best is not None:
                reason, stop_seq = STOP_SEQUENCE, best[1]
                final_text = text[:best[0] + (len(best[1]) if req.include_stop_sequence else 0)]
        if reason is None and n >= req.max_new_tokens:
            reason = MAX_TOKENS
        if reason is not None and final_text is None:
            text = seq.detok.flush()
        if reason is None:
            upto = len(text) - self._holdback(text, req.stop_sequences)
            delta = text[seq.sent_chars:upto] if upto > seq.sent_chars else ""
            seq.sent_chars = max(seq.sent_chars, upto)
            seq.events.put(TokenEvent(tok, delta, logprob, top, n))
            return
        # last token: it goes out with the finish event
        self._finish(seq, reason, text=final_text if final_text is not None else text, stop_seq=stop_seq,
                     last=TokenEvent(tok, "", logprob, top, n))

    def _finish(self, seq: Sequence, reason: str, text: str | None = None, stop_seq: str = "",
                error: str = "", admitted: bool = True, last: TokenEvent | None = None) -> None:
        if seq.finished is not None:
            return
        seq.finished = reason
        if seq.seq_id in self._running:
            del self._running[seq.seq_id]
            try:
                self._session.remove(seq.seq_id)
            except Exception:
                log.exception("session.remove failed", extra={"event": "engine_error"})
            self.metrics.running.set(len(self._running))
        if text is None:
            try:
                text = self.tokenizer.decode(seq.output_ids) if seq.output_ids else ""
            except Exception:   # noqa: BLE001 - the request ends either way; its text is lost
                log.exception("decode failed", extra={"event": "request_error"})
                text, reason = "", ERROR if reason not in (CANCELLED, TIME_LIMIT) else reason
        if reason in _NO_TEXT:
            delta = ""
        else:
            delta = text[seq.sent_chars:] if len(text) > seq.sent_chars else ""
        if seq.last_token is not None:
            self.metrics.e2e.observe(time.monotonic() - seq.arrival)
        try:
            if seq.on_finish is not None:
                seq.on_finish(seq, reason)
        finally:
            seq.events.put(FinishEvent(reason, text, delta, list(seq.output_ids), stop_seq, error, last))
            with self._cond:
                self._cond.notify_all()

    def _run_jobs(self) -> None:
        with self._cond:
            job = self._high.pop(0) if self._high else None
        if job is not None:
            self._run(job)
        idle = not self._running and not self._waiting
        if idle or self._steps % self.lane_every_steps == 0:
            with self._cond:
                job = self._low.pop(0) if self._low else None
            if job is not None:
                self._run(job)

    @staticmethod
    def _run(job) -> None:
        fn, fut = job
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - reported to the waiter
            fut.set_exception(e)
