"""What every front-end does with a request, in domain types: admit (resolve and pin packs, submit to
the engine), follow its events, score, tokenize.

The gRPC servicer (serve.server) and the OpenAI-compatible HTTP API (serve.http) both call this
module with validated `GenerationRequest` / `ScoreRequest`s (serve.params) and get domain results
or `serve.errors.ServeError`s back; each maps them to its own wire format and status codes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol

from serve import engine as eng
from serve import scheduler as sched
from serve.errors import Cancelled, DeadlineExceeded, InternalError, InvalidRequest, ServeError, Unavailable
from serve.metrics import GRPC
from serve.packs import Admission, PackManager
from serve.params import GenerationRequest, ScoreRequest
from serve.scoring import ScoreAbandoned, ScoreJob, Scorer, TopLogprobs
from serve.tenants import OPEN, Tenant


class EngineAPI(Protocol):
    """The engine as the front-ends use it (serve.engine.Engine, serve.vllm.engine.VLLMEngine)."""

    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...

    def submit(
        self,
        req: GenerationRequest,
        packs: list,
        deadline: float | None = None,
        on_finish=None,
        frontend: str = GRPC,
    ) -> sched.Sequence: ...
    def cancel(self, seq: sched.Sequence, reason: str = sched.CANCELLED) -> None: ...
    def run_job(self, fn: Callable, high: bool = True) -> futures.Future: ...
    def begin_score(self, tokens: int = 0) -> None: ...
    def end_score(self, tokens: int = 0) -> None: ...
    @property
    def limits(self) -> Any: ...  # serve.config.LimitsConfig


def wait_for(job: ScoreJob, deadline: float | None, abandoned: threading.Event | None = None, poll: float = 0.25):
    """The job's result; abandons it and raises futures.TimeoutError at `deadline`, ScoreAbandoned once
    `abandoned` is set (checked every `poll` s)."""
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if (left is not None and left <= 0) or (abandoned is not None and abandoned.is_set()):
            job.cancel()
            raise futures.TimeoutError() if abandoned is None or not abandoned.is_set() else ScoreAbandoned()
        try:
            return job.result(timeout=poll if left is None else min(left, poll))
        except futures.TimeoutError:
            continue


class FinishObserver(Protocol):
    """The live A/B monitor as admission sees it: told about requests that finished normally."""

    def on_finished(self, pins, prompt_ids: list[int], output_ids: list[int]) -> None: ...


@dataclass(frozen=True)
class PackUsage:
    """One pack as a request was served with it (arm "base": A/B control, or a disabled version)."""

    ref: str
    name: str
    version: str
    beta: float
    arm: str


def ended_reason(seq: sched.Sequence) -> str:
    """Why a request ended early: its deadline (with a little slack for clock skew) or a cancel."""
    if seq.deadline is not None and time.monotonic() >= seq.deadline - 0.05:
        return sched.TIME_LIMIT
    return sched.CANCELLED


def finish_error(ev: eng.FinishEvent) -> ServeError | None:
    """The error a finish event stands for (None: the request finished normally)."""
    if ev.reason == sched.REFUSED:  # the error names the refused field
        return InvalidRequest("", ev.error)
    if ev.reason == sched.SHUTDOWN:
        return Unavailable("", f"server shutting down: the request was cut after {len(ev.output_ids)} tokens; retry")
    if ev.reason == sched.UNAVAILABLE:  # the model runner died (vLLM's engine core): the server restarts
        return Unavailable("", f"{ev.error} after {len(ev.output_ids)} tokens")
    cls = {sched.CANCELLED: Cancelled, sched.TIME_LIMIT: DeadlineExceeded, sched.ERROR: InternalError}.get(ev.reason)
    if cls is None:
        return None
    return cls(
        "",
        f"generation {ev.reason.lower()}"
        + (f": {ev.error}" if ev.error else "")
        + f" after {len(ev.output_ids)} tokens",
    )


def reason_error(reason: str) -> type[ServeError]:
    """The error class of an early end (sched.CANCELLED / sched.TIME_LIMIT), for counting."""
    return DeadlineExceeded if reason == sched.TIME_LIMIT else Cancelled


def packs_used(admission: Admission) -> list[PackUsage]:
    return [PackUsage(p.request.ref, p.name, p.version, p.beta if p.resident else 0.0, p.arm) for p in admission.pins]


class Generation:
    """One admitted generation request: its pinned packs and its engine sequence."""

    def __init__(self, service: GenerationService, req: GenerationRequest, admission: Admission, seq: sched.Sequence):
        self.service, self.req, self.admission, self.seq = service, req, admission, seq

    @property
    def packs(self) -> list[PackUsage]:
        return packs_used(self.admission)

    @property
    def seed(self) -> int | None:
        return self.seq.seed

    def cancel(self, reason: str | None = None) -> None:
        """Free the slot at the next engine step (idempotent; a finished request is left as it is)."""
        self.service.engine.cancel(self.seq, reason or ended_reason(self.seq))

    def events(self, is_active: Callable[[], bool] = lambda: True) -> Iterator[eng.TokenEvent | eng.FinishEvent]:
        """The engine's events up to and including the FinishEvent; polls `is_active` while waiting and
        cancels the request when the client is gone."""
        while True:
            try:
                ev = self.seq.events.get(timeout=0.5)
            except queue.Empty:
                if not is_active():
                    self.cancel()
                continue
            yield ev
            if isinstance(ev, eng.FinishEvent):
                return

    def prompt_logprobs(self, timeout: float | None, top_n: int | None = None) -> PromptScores:
        """log p(prompt[i] | prompt[<i]), i >= 1, under the served distribution (the pinned packs)."""
        try:
            return self.service.prompt_scores(self.req, self.admission, timeout, top_n)
        except DeadlineExceeded:
            self.cancel(sched.TIME_LIMIT)
            raise


@dataclass
class PromptScores:
    """A prompt's token log-probs from its second token on (the served distribution), and with `top_n`
    each position's rank and top tokens (serve.scoring.TopLogprobs)."""

    logprobs: list[float]
    top: TopLogprobs | None = None


@dataclass
class ScoreResult:
    base: list  # per continuation: log-prob tensors (None entries when not asked)
    packed: list
    packs: list[PackUsage]


class GenerationService:
    """The front-end-neutral request path over one engine and one pack manager."""

    def __init__(
        self, engine: EngineAPI, packs: PackManager, monitor: FinishObserver | None, scorer: Scorer, tokenizer
    ):
        self.engine, self.packs, self.monitor = engine, packs, monitor
        self.scorer, self.tokenizer = scorer, tokenizer

    # ---- generation
    def generate(
        self, req: GenerationRequest, deadline: float | None = None, frontend: str = GRPC, tenant: Tenant | None = None
    ) -> Generation:
        """Pin the request's packs (those `tenant` may see) and submit it (QueueFull, Unavailable, PackNotFound,
        ...)."""
        admission = self._admit(req.packs, req.ab_key, deadline, frontend, tenant)
        monitor = self.monitor

        def on_finish(seq, reason):
            admission.release()
            if monitor is not None and reason in (sched.MAX_TOKENS, sched.EOS_TOKEN, sched.STOP_SEQUENCE):
                monitor.on_finished(admission.pins, seq.req.prompt_ids, seq.output_ids)

        try:
            seq = self.engine.submit(req, admission.pack_refs, deadline, on_finish=on_finish, frontend=frontend)
        except BaseException:
            admission.release()
            raise
        return Generation(self, req, admission, seq)

    def _admit(
        self, packs: list, ab_key: str, deadline: float | None, frontend: str, tenant: Tenant | None
    ) -> Admission:
        """The request's packs pinned, and its slot among its tenant's requests taken (both freed by
        `Admission.release`)."""
        metrics = self.packs.metrics
        if tenant is not None:
            tenant.enter(metrics)
        try:
            admission = self.packs.admit(packs, ab_key, deadline=deadline, tenant=tenant)
        except BaseException:
            if tenant is not None:
                tenant.leave(metrics)
            raise
        metrics.tenant_requests.labels(OPEN if tenant is None else tenant.name, frontend).inc()
        if tenant is not None:
            admission.on_release(lambda: tenant.leave(metrics))
        return admission

    # ---- scoring
    def prompt_scores(
        self, req: GenerationRequest, admission: Admission, timeout: float | None, top_n: int | None = None
    ) -> PromptScores:
        """The prompt's log-probs under `admission`'s pinned packs (Score's numbers for the same rows)."""
        if len(req.prompt_ids) < 2:
            return PromptScores([], None)
        refs = admission.pack_refs
        job = self.scorer.score(
            req.prompt_ids[:1], req.prompt_ids[1:], refs, want_base=not refs, want_packed=bool(refs), top_n=top_n
        )
        try:
            out = wait_for(job, None if timeout is None else time.monotonic() + timeout)
        except futures.TimeoutError:
            raise DeadlineExceeded("response.prompt_logprobs", "deadline exceeded") from None
        base, packed = out[0], out[1]
        return PromptScores((packed if refs else base).double().tolist(), out[2] if top_n is not None else None)

    def score_prompt(
        self,
        req: GenerationRequest,
        deadline: float | None,
        top_n: int | None = None,
        score: bool = True,
        frontend: str = GRPC,
        tenant: Tenant | None = None,
    ) -> tuple[PromptScores | None, list[PackUsage]]:
        """Pin the request's packs and score its prompt (`score`), generating nothing (OpenAI's echo with
        max_tokens 0): (PromptScores or None, the packs used)."""
        admission = self._admit(req.packs, req.ab_key, deadline, frontend, tenant)
        try:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            scores = self.prompt_scores(req, admission, left, top_n) if score else None
            used = packs_used(admission)
        finally:
            admission.release()
        return scores, used

    def score(
        self,
        req: ScoreRequest,
        deadline: float | None,
        is_active: Callable[[], bool],
        abandoned: threading.Event,
        tenant: Tenant | None = None,
    ) -> ScoreResult:
        """Log-likelihoods of each continuation through the scorer (serve.scoring: embedded, one engine
        job per chunk of positions; vLLM, forced decoding in its batch), in bounded memory, one
        continuation at a time. `abandoned` (set by the front-end when the client goes) or the deadline
        abandons it: Cancelled / DeadlineExceeded. Counted against the request cap."""
        admission = self._admit(req.packs, "", deadline, GRPC, tenant)
        try:
            base, packed = self._score_rows(req, admission, deadline, is_active, abandoned)
        finally:
            admission.release()
        usage = [
            PackUsage(p.request.ref, p.name, p.version, p.beta if p.resident else 0.0, p.arm) for p in admission.pins
        ]
        return ScoreResult(base, packed, usage)

    def _score_rows(self, req, admission, deadline, is_active, abandoned):
        refs = [p.resident.pack_ref(p.beta) for p in admission.pins if p.resident is not None]
        sizes = [len(req.prefix_ids) + len(c) for c in req.continuations]
        budget = self.engine.limits.max_batched_tokens
        # a scorer that batches rows itself (vLLM) takes every continuation at once when they fit the token
        # budget; otherwise one continuation at a time (bounded memory on the embedded engine)
        together = self.scorer.concurrent and (budget is None or sum(sizes) <= budget)
        groups = [list(range(len(sizes)))] if together else [[i] for i in range(len(sizes))]
        tokens = max(sum(sizes[i] for i in g) for g in groups)
        self.engine.begin_score(tokens)
        base, packed = [], []
        try:
            for group in groups:
                jobs = [
                    self.scorer.score(req.prefix_ids, req.continuations[i], refs, req.include_base, bool(req.packs))
                    for i in group
                ]
                try:
                    for job in jobs:
                        b, p = wait_for(job, deadline, abandoned)
                        base.append(b)
                        packed.append(p)
                except (futures.TimeoutError, ScoreAbandoned):
                    abandoned.set()
                    for job in jobs:
                        job.cancel()
                    active = is_active()
                    cls = DeadlineExceeded if active else Cancelled
                    raise cls(
                        "",
                        f"score: {'deadline exceeded' if active else 'cancelled'} after "
                        f"{len(base)} of {len(req.continuations)} continuations",
                    ) from None
                except BaseException:
                    for job in jobs:
                        job.cancel()
                    raise
        finally:
            self.engine.end_score(tokens)
        return base, packed

    # ---- text
    def tokenize(self, text: str) -> list[int]:
        if len(text) > 1_000_000:
            raise InvalidRequest("text", "longer than 1000000 characters")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def token_text(self, token_id: int, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)
