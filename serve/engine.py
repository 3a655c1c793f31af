"""The engine: one thread that turns the scheduler's decisions into model steps and events.

The rooms, as in vLLM:

* `serve.scheduler.Scheduler`: the waiting queue, the running set, admission by requests and
  tokens, reaping of cancelled / expired requests, the job lanes (Score, gate, A/B re-scoring);
* a model runner (`Runner` below): `EmbeddedRunner` runs the ensemble core's batch session and the
  batched sampler (`serve.sampler`) in-process; `serve.vllm.engine.VLLMRunner` steps vLLM, whose
  sampler calls the sensepack logits processor;
* `serve.detok.IncrementalDetokenizer`: each request's text at O(window) per token.

`Engine` owns the one thread that touches the runner, so the ensemble core is never entered from
two threads. Each iteration reads top to bottom:

1. reap: cancelled / deadline-exceeded requests finish (their slot is freed at once);
2. prefill: the scheduler's newly admitted requests enter the runner's batch (the embedded session
   prefills them inside the next step);
3. step: one decode step for every running row; each new token is accepted (detokenised, stop
   conditions checked, a TokenEvent sent) and finished requests leave the batch;
4. jobs: a high-priority job every iteration, a low-priority one when idle or every
   `lane_every_steps` steps.

Requests talk to the servicer through a per-request `queue.Queue` of events.

Fault isolation: a failure that belongs to one request (refused by the runner at admission,
sampling its row, detokenising its text) ends that request alone; a failure of the shared model
step ends the running requests with ERROR and the runner starts from an empty batch; a runner
that is dead (`RunnerDead`: vLLM's engine core process is gone) ends them with UNAVAILABLE and the
engine calls `on_dead` (the server goes NOT_SERVING and exits for its orchestrator to restart it).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from ensemble.vocab import Vocabulary
from serve.detok import IncrementalDetokenizer
from serve.metrics import GRPC
from serve.params import GenerationRequest
from serve.sampler import RowParams, Sampled, sample
from serve.scheduler import (
    CANCELLED,
    EOS_TOKEN,
    ERROR,
    MAX_TOKENS,
    REFUSED,
    SHUTDOWN,
    STOP_SEQUENCE,
    STOP_TOKEN,
    TIME_LIMIT,
    UNAVAILABLE,
    Scheduler,
    Sequence,
)
from serve.structured import grammars_for

if TYPE_CHECKING:
    from ensemble.ensemble import Ensemble, EnsembleBatch

log = logging.getLogger("sensepack.engine")

_NO_TEXT = (CANCELLED, TIME_LIMIT, ERROR, REFUSED, SHUTDOWN, UNAVAILABLE)


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
    text: str  # the whole generated text (stop sequence handled)
    text_delta: str  # text not yet sent in TokenEvents
    output_ids: list[int]
    stop_sequence: str = ""
    error: str = ""
    last: TokenEvent | None = None  # the final generated token, when generation ended normally


class Refused(Exception):
    """The runner refuses this request at admission (INVALID_ARGUMENT); the message names the field."""


class RunnerDead(Exception):
    """The runner cannot step any more (e.g. vLLM's engine core process died)."""


@dataclass
class CoreCounters:
    """The ensemble core's running totals, read after every step (exported as metrics)."""

    exact_skip_rows: int = 0
    window_reprefills: int = 0
    backpack_seconds: float = 0.0
    resumed: int = 0  # vLLM re-adds that resumed a parked Backpack state (no prefill)
    step_seconds: list[float] = field(default_factory=list)  # Backpack time of each step where it ran,
    #                                                           since the last read


@dataclass
class RowOutput:
    """One request's result of a step."""

    seq_id: int
    tokens: list[Sampled] = field(default_factory=list)  # in order (vLLM may hand several per step)
    error: str = ""  # this row failed (e.g. sampling): its request ends alone
    finished: bool = False  # the runner ended the row itself (vLLM: max_tokens / EOS)


class Runner(Protocol):
    """The model side of an engine. Called only from the engine thread (`start` before it runs)."""

    def start(self) -> None: ...
    def add(self, seq: Sequence) -> None: ...  # Refused / any exception: that request alone ends
    def remove(self, seq_id: int) -> None: ...
    def step(self, running: dict[int, Sequence]) -> list[RowOutput]: ...  # RunnerDead: nothing can run
    def recover(self) -> None: ...  # after a failed step: an empty batch
    def counters(self, idle: bool) -> CoreCounters: ...  # after each step (idle: the batch just emptied)
    def dead(self) -> str | None: ...  # why the runner cannot step any more, if so
    def busy(self) -> bool: ...  # work of its own in flight (vLLM: forced scoring): step even with no request
    def abandon(self, why: str) -> None: ...  # the runner died: fail that work
    def shutdown(self) -> None: ...


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def row_params(seq: Sequence, tokenizer=None, vocab_size: int = 0) -> RowParams:
    """What the sampler needs of a request at this step (its output so far decides the min-token masks; a
    response_format's grammar state is made at the first step, from the served `tokenizer`)."""
    sp = seq.req.sampling
    if sp.response_format is not None and seq.grammar is None and tokenizer is not None:
        seq.grammar = grammars_for(tokenizer, vocab_size).start(sp.response_format)
    return RowParams(
        sp,
        mask_eos=len(seq.output_ids) < sp.min_new_tokens and not sp.ignore_eos,
        generator=seq.generator,
        prompt_ids=seq.req.prompt_ids if sp.penalized else None,
        output_ids=seq.output_ids if sp.penalized else None,
        mask_stop_ids=len(seq.output_ids) < sp.min_new_tokens,
        grammar=seq.grammar,
    )


def sample_isolated(
    lp: torch.Tensor, seqs: list[Sequence], eos_id: int, tokenizer=None, vocab_size: int = 0
) -> list[RowOutput]:
    """Sample every row together; when that fails, row by row, so only the failing rows get an error."""
    params = [row_params(s, tokenizer, vocab_size) for s in seqs]
    try:
        return [RowOutput(s.seq_id, [out]) for s, out in zip(seqs, sample(lp, params, eos_id), strict=True)]
    except Exception:  # noqa: BLE001 - find the faulty row(s): the batch must not pay for one request
        log.warning("batched sampling failed; sampling row by row", extra={"event": "sampler_fallback"})
    outs = []
    for r, (seq, p) in enumerate(zip(seqs, params, strict=True)):
        try:
            outs.append(RowOutput(seq.seq_id, [sample(lp[r : r + 1], [p], eos_id)[0]]))
        except Exception as e:  # this request alone ends
            log.exception(
                "sampling failed for one request", extra={"event": "request_error", "request_id": seq.req.request_id}
            )
            outs.append(RowOutput(seq.seq_id, error=f"sampling failed: {_describe(e)}"))
    return outs


class EmbeddedRunner:
    """The ensemble core's batch session and the batched sampler, in-process."""

    def __init__(self, ensemble: Ensemble, vocab: Vocabulary, prefill_chunk: int | None = None):
        self.ensemble = ensemble
        self.vocab = vocab
        self.prefill_chunk = prefill_chunk  # prompt tokens per step (chunked prefill); None: whole prompts
        self._session: EnsembleBatch | None = None
        self._totals = CoreCounters()  # the decode steps' share of the core's stats (Score and gate jobs
        #                                 use the same core between steps)

    def start(self) -> None:
        self._session = self.ensemble.new_batch()

    @property
    def session(self) -> EnsembleBatch:
        if self._session is None:
            raise RuntimeError("EmbeddedRunner: start() was not called")
        return self._session

    def add(self, seq: Sequence) -> None:
        self.session.add(seq.seq_id, list(seq.req.prompt_ids), list(seq.packs))  # prefilled at the next step

    def remove(self, seq_id: int) -> None:
        self.session.remove(seq_id)

    def step(self, running: dict[int, Sequence]) -> list[RowOutput]:
        st = self.ensemble.stats
        skip, rep, secs = st.exact_skip_rows, st.window_reprefills, st.backpack_seconds
        lp = self.session.logprobs(self.prefill_chunk)
        t = self._totals
        t.exact_skip_rows += st.exact_skip_rows - skip
        t.window_reprefills += st.window_reprefills - rep
        if st.backpack_seconds > secs:  # a step where the Backpack ran (exact-skip steps are not observed)
            t.backpack_seconds += st.backpack_seconds - secs
            t.step_seconds.append(st.backpack_seconds - secs)
        live = [(r, running[sid]) for r, sid in enumerate(self.session.seq_ids) if sid in running]
        if not live:
            return []
        outs = sample_isolated(
            lp[[r for r, _ in live]], [s for _, s in live], self.vocab.eos_id, self.ensemble.tokenizer, self.vocab.size
        )
        self.session.append({o.seq_id: o.tokens[0].token for o in outs if o.tokens})
        return outs

    def recover(self) -> None:
        self._session = self.ensemble.new_batch()

    def counters(self, idle: bool) -> CoreCounters:
        t = self._totals
        out = CoreCounters(t.exact_skip_rows, t.window_reprefills, t.backpack_seconds, step_seconds=t.step_seconds)
        t.step_seconds = []
        return out

    def dead(self) -> str | None:
        return None

    def busy(self) -> bool:
        return False  # Score runs as engine jobs (serve.scoring.EmbeddedScorer)

    def abandon(self, why: str) -> None:
        pass

    def shutdown(self) -> None:
        pass


class Engine:
    """The serve engine surface (submit / cancel / run_job / drain / stop ...) over a scheduler and a runner.

    `Engine(ensemble, tokenizer, limits, metrics)` is the embedded engine; pass `runner=` for another
    model runner (serve.vllm.engine.VLLMEngine does)."""

    log_name = "engine"

    def __init__(
        self,
        ensemble,
        tokenizer,
        limits,
        metrics,
        lane_every_steps: int = 8,
        runner: Runner | None = None,
        vocab: Vocabulary | None = None,
    ):
        self.ensemble = ensemble
        self.tokenizer = tokenizer
        # EOS and the sampling range come from the served pairing (vLLM without an ensemble: its tokenizer)
        self.vocab: Vocabulary = vocab or (
            ensemble.vocab if ensemble is not None else Vocabulary.from_tokenizer(tokenizer)
        )
        self.limits = limits
        self.metrics = metrics
        self.scheduler = Scheduler(limits, metrics, lane_every_steps)
        self.runner: Runner = (
            runner if runner is not None else EmbeddedRunner(ensemble, self.vocab, limits.prefill_chunk_tokens)
        )
        self.on_dead: Callable[[str], None] | None = None  # called once (engine thread) when the runner dies
        self.dead: str | None = None
        self.liveness_interval = 1.0  # s: an idle engine still notices a dead runner this often
        self._counters = CoreCounters()
        self._thread: threading.Thread | None = None
        self.decode_steps = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.runner.start()
        self._thread = threading.Thread(
            target=self._loop, name=f"sensepack-{self.log_name.replace(' ', '-')}", daemon=True
        )
        self._thread.start()

    def stop_accepting(self) -> None:
        self.scheduler.stop_accepting()

    def drain(self, timeout: float | None) -> bool:
        """Wait until no request is running or waiting; True when drained."""
        return self.scheduler.drain(timeout)

    def stop(self, drain_timeout: float | None = 0.0) -> None:
        self.stop_accepting()
        if drain_timeout:
            self.drain(drain_timeout)
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.scheduler.fail_jobs()
        try:
            self.runner.shutdown()
        except Exception:  # best effort: the process may be exiting
            log.exception(f"{self.log_name} shutdown failed", extra={"event": "engine_error"})

    # ------------------------------------------------------------ public API
    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def scoring(self) -> int:
        return self.scheduler.scoring

    def submit(
        self,
        req: GenerationRequest,
        packs: list,
        deadline: float | None = None,
        on_finish=None,
        frontend: str = GRPC,
    ) -> Sequence:
        seed, gen = req.sampling.seed, None
        if not req.sampling.greedy:
            if seed is None:
                seed = int.from_bytes(os.urandom(7), "little")
            gen = torch.Generator().manual_seed(seed)
        seq = Sequence(
            self.scheduler.next_id(),
            req,
            packs,
            queue.Queue(),
            on_finish,
            deadline,
            generator=gen,
            seed=seed,
            frontend=frontend,
        )
        self.scheduler.add(seq)
        return seq

    def begin_score(self, tokens: int = 0) -> None:
        """Count a Score RPC against the request cap, and its `tokens` (the most it holds at once)
        against limits.max_batched_tokens, until `end_score(tokens)` (RESOURCE_EXHAUSTED when full)."""
        self.scheduler.begin_score(tokens)

    def end_score(self, tokens: int = 0) -> None:
        self.scheduler.end_score(tokens)

    def cut(self, reason: str = SHUTDOWN) -> None:
        """End every waiting and running request with `reason` (at the next loop iteration)."""
        self.scheduler.cut(reason)

    def cancel(self, seq: Sequence, reason: str = CANCELLED) -> None:
        self.scheduler.cancel(seq, reason)

    def run_job(self, fn: Callable, high: bool = True) -> Future:
        return self.scheduler.submit_job(fn, high)

    def pending_low(self) -> int:
        return self.scheduler.pending_low()

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        sched = self.scheduler
        while sched.wait_for_work(self.liveness_interval, busy=self.runner.busy):
            try:
                why = self.runner.dead()
                if why:
                    raise RunnerDead(why)
                for seq, _ in sched.reap():
                    if seq.cancel_reason is None:  # reap() returns cancelled or expired requests only
                        raise RuntimeError(f"scheduler reaped request {seq.seq_id} without a cancel reason")
                    self._finish(seq, seq.cancel_reason)
                self._prefill(sched.schedule())
                if sched.running or self.runner.busy():
                    self._step()
                for job in sched.next_jobs(self.decode_steps):
                    self._run(job)
            except RunnerDead as e:
                self._runner_died(_describe(e))
                return
            except Exception as e:  # the engine must survive one bad step
                log.exception(f"{self.log_name} step failed", extra={"event": "engine_error"})
                for seq in list(sched.running.values()):
                    self._finish(seq, ERROR, error=_describe(e))
                self.runner.recover()
        for seq in sched.leftovers():
            self._finish(seq, seq.cancel_reason or CANCELLED)

    def _runner_died(self, why: str) -> None:
        """Nothing can run any more: every request ends UNAVAILABLE, new ones are refused, `on_dead` is told."""
        log.error(f"{self.log_name}: the model runner died: {why}", extra={"event": "engine_dead"})
        self.dead = why
        sched = self.scheduler
        sched.stop_accepting()
        sched.cut(UNAVAILABLE)
        for seq, _ in sched.reap():
            self._finish(seq, UNAVAILABLE, error=f"the model runner died ({why}); retry")
        sched.stop()
        sched.fail_jobs()
        self.runner.abandon(why)
        if self.on_dead is not None:
            try:
                self.on_dead(why)
            except Exception:  # the requests are ended either way
                log.exception("on_dead failed", extra={"event": "engine_error"})

    def _prefill(self, new: list[Sequence]) -> None:
        """The newly admitted requests enter the runner's batch; one it refuses ends alone."""
        now = time.monotonic()
        try:
            for k, seq in enumerate(new):
                try:
                    self.runner.add(seq)
                except RunnerDead:  # this one and the rest of the admitted ones end with it
                    for s in new[k:]:
                        s.cancel(UNAVAILABLE)
                        self._finish(s, UNAVAILABLE, error="the model runner died; retry")
                    raise
                except Refused as e:
                    log.warning("request refused by the runner", extra={"event": "engine_add_failed"})
                    self._finish(seq, REFUSED, error=f"{seq.req.input_field}: {e}")
                    continue
                except Exception as e:  # refused by the core (e.g. invalid edits): this one only
                    log.exception("request refused by the core", extra={"event": "engine_add_failed"})
                    self._finish(seq, ERROR, error=_describe(e))
                    continue
                self.scheduler.start_running(seq, now)
                self.metrics.latency[seq.frontend].queue_time.observe(now - seq.arrival)
                self.metrics.prompt_tokens.inc(len(seq.req.prompt_ids))
        finally:
            self.scheduler.end_admission()

    def _step(self) -> None:
        running = self.scheduler.running
        outs = self.runner.step(running)
        self.decode_steps += 1
        now = time.monotonic()
        for out in outs:
            seq = running.get(out.seq_id)
            if seq is None or seq.finished is not None:
                continue
            if out.error:
                self._finish(seq, ERROR, error=out.error)
                continue
            for s in out.tokens:
                try:
                    self._accept(seq, s.token, s.logprob, s.top, now)
                except Exception as e:  # e.g. detokenising: this request alone ends
                    log.exception(
                        "accepting a token failed", extra={"event": "request_error", "request_id": seq.req.request_id}
                    )
                    self._finish(seq, ERROR, error=_describe(e))
                if seq.finished is not None:
                    break
            if out.finished and seq.finished is None:
                # the runner ended it (vLLM: max_tokens / EOS) without our stop logic firing: finish consistently
                eos = seq.output_ids and seq.output_ids[-1] == self.vocab.eos_id and not seq.req.sampling.ignore_eos
                self._finish(seq, EOS_TOKEN if eos else MAX_TOKENS)
        self._export_counters(self.runner.counters(idle=not running and not self.runner.busy()))

    def _export_counters(self, now: CoreCounters) -> None:
        """The core's counters since the last read as metrics (row-steps skipped, window re-prefills,
        resumed re-adds, Backpack time per step where it ran: exact-skip steps are not observed)."""
        m, before = self.metrics, self._counters
        if now.exact_skip_rows > before.exact_skip_rows:
            m.exact_skip_steps.inc(now.exact_skip_rows - before.exact_skip_rows)
        if now.window_reprefills > before.window_reprefills:
            m.window_reprefills.inc(now.window_reprefills - before.window_reprefills)
        if now.resumed > before.resumed:
            m.backpack_resumes.inc(now.resumed - before.resumed)
        for secs in now.step_seconds:
            m.backpack_step.observe(secs)
        self._counters = now

    @staticmethod
    def _holdback(text: str, stops: Iterable[str]) -> int:
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
            self.metrics.latency[seq.frontend].ttft.observe(now - seq.arrival)
        else:
            self.metrics.latency[seq.frontend].itl.observe(now - seq.last_token)
        seq.last_token = now
        self.metrics.generation_tokens.inc()

        reason, stop_seq, final_text = None, "", None
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, req.sampling.skip_special_tokens)
        seq.detok.add(tok)
        text = seq.detok.text  # complete characters only; an unfinished one is held back
        if seq.grammar is not None:
            seq.grammar.accept(tok)
        if tok == self.vocab.eos_id and not req.sampling.ignore_eos and n > req.sampling.min_new_tokens - 1:
            reason = EOS_TOKEN
        elif tok in req.sampling.stop_token_ids and n >= req.sampling.min_new_tokens:
            reason = STOP_TOKEN
        elif seq.grammar is not None and seq.grammar.finished:  # the response_format is complete
            reason = EOS_TOKEN
        if req.sampling.stop_sequences and n >= req.sampling.min_new_tokens:
            best = None
            for s in req.sampling.stop_sequences:  # only the text not searched yet (plus a stop's length of overlap)
                p = text.find(s, max(0, seq.stop_scan - len(s) + 1))
                if p >= 0 and (best is None or p < best[0]):
                    best = (p, s)
            seq.stop_scan = len(text)
            if best is not None:
                reason, stop_seq = STOP_SEQUENCE, best[1]
                final_text = text[: best[0] + (len(best[1]) if req.sampling.include_stop_sequence else 0)]
        if reason is None and n >= req.sampling.max_new_tokens:
            reason = MAX_TOKENS
        if reason is not None and final_text is None:
            text = seq.detok.flush()
        if reason is None:
            upto = len(text) - self._holdback(text, req.sampling.stop_sequences)
            delta = text[seq.sent_chars : upto] if upto > seq.sent_chars else ""
            seq.sent_chars = max(seq.sent_chars, upto)
            seq.events.put(TokenEvent(tok, delta, logprob, top, n))
            return
        # last token: it goes out with the finish event
        self._finish(
            seq,
            reason,
            text=final_text if final_text is not None else text,
            stop_seq=stop_seq,
            last=TokenEvent(tok, "", logprob, top, n),
        )

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        text: str | None = None,
        stop_seq: str = "",
        error: str = "",
        last: TokenEvent | None = None,
    ) -> None:
        if seq.finished is not None:
            return
        seq.finished = reason
        if self.scheduler.release(seq) and self.dead is None:
            try:
                self.runner.remove(seq.seq_id)
            except Exception:  # the request ends either way
                log.exception("runner.remove failed", extra={"event": "engine_error"})
        if text is None:
            try:
                text = self.tokenizer.decode(seq.output_ids) if seq.output_ids else ""
            except Exception:  # the request ends either way; its text is lost
                log.exception("decode failed", extra={"event": "request_error"})
                text, reason = "", ERROR if reason not in (CANCELLED, TIME_LIMIT) else reason
        delta = "" if reason in _NO_TEXT else text[seq.sent_chars :]
        if seq.last_token is not None:
            self.metrics.latency[seq.frontend].e2e.observe(time.monotonic() - seq.arrival)
        try:
            if seq.on_finish is not None:
                seq.on_finish(seq, reason)
        finally:
            seq.events.put(FinishEvent(reason, text, delta, list(seq.output_ids), stop_seq, error, last))
            with self.scheduler.cond:
                self.scheduler.cond.notify_all()

    @staticmethod
    def _run(job) -> None:
        fn, fut = job
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - reported to the waiter
            fut.set_exception(e)
