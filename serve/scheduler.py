"""The scheduler: which requests wait, which run, and which jobs run between decode steps.

As in vLLM, the scheduler owns no model. It holds the request state (`Sequence`), the waiting
queue (FIFO), the running set, the Score RPCs in progress, and the two job lanes, all behind
one condition variable that request threads and the engine thread share:

* request threads call `add` (QueueFull, RESOURCE_EXHAUSTED, when full), `cancel`, `cut`, `begin_score` /
  `end_score` and `submit_job`;
* the engine thread calls, each iteration, `wait_for_work`, `reap` (cancelled / expired requests
  to finish), `schedule` (the waiting requests that join the batch now) then `start_running` per
  admitted request and `end_admission`, `release` when a request finishes, and `next_jobs`.

Admission is by requests and by tokens: a waiting request joins while a running slot is free
(`limits.max_running`) and, with `limits.max_batched_tokens`, while its prompt + max_new_tokens
fit the budget left by the running requests and the Scores in progress (each Score holds prefix +
its longest continuation). Running, admitting, waiting and Score requests share the cap
`limits.max_running + limits.max_waiting`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from serve.errors import QueueFull, Unavailable
from serve.params import GenerationRequest

if TYPE_CHECKING:
    from serve.detok import IncrementalDetokenizer

# finish reasons (mirror proto StopReason names)
MAX_TOKENS, EOS_TOKEN, STOP_SEQUENCE, CANCELLED, TIME_LIMIT, ERROR = (
    "MAX_TOKENS",
    "EOS_TOKEN",
    "STOP_SEQUENCE",
    "CANCELLED",
    "TIME_LIMIT",
    "ERROR",
)
STOP_TOKEN = "STOP_TOKEN"  # a token of stopping.stop_token_ids
REFUSED = "REFUSED"  # the engine refused the request at admission (InvalidRequest; proto ERROR)
SHUTDOWN = "SHUTDOWN"  # cut by a shutdown that outlived the grace period (Unavailable; proto CANCELLED)
UNAVAILABLE = "UNAVAILABLE"  # the model runner died under the request (Unavailable; proto ERROR): retry


@dataclass
class Sequence:
    seq_id: int
    req: GenerationRequest
    packs: list  # list[PackRef] pinned at admission (β applied)
    events: queue.Queue
    on_finish: Callable[[Sequence, str], None] | None = None
    deadline: float | None = None  # time.monotonic()
    arrival: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    seed: int | None = None
    output_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0
    detok: IncrementalDetokenizer | None = None  # made at the first token
    stop_scan: int = 0  # stop sequences were searched (without a match) before this character
    admitted: float | None = None
    last_token: float | None = None
    cancel_reason: str | None = None
    finished: str | None = None
    frontend: str = "grpc"  # serve.metrics.GRPC or HTTP: the latency histograms' label
    grammar: Any = None  # serve.structured.GrammarState of a response_format (embedded sampler), made at the first step

    def cancel(self, reason: str = CANCELLED) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason

    @property
    def budget(self) -> int:
        """Tokens the request may hold in the batch: its prompt and every token it may generate."""
        return len(self.req.prompt_ids) + self.req.sampling.max_new_tokens


class EngineStopped(Unavailable):
    def __init__(self, field_name: str = "", message: str = "server is shutting down"):
        super().__init__(field_name, message)


Job = tuple[Callable, Future]


class Scheduler:
    def __init__(self, limits, metrics, lane_every_steps: int = 8):
        self.limits = limits
        self.metrics = metrics
        self.lane_every_steps = lane_every_steps
        self.cond = threading.Condition()
        self.waiting: list[Sequence] = []
        self.running: dict[int, Sequence] = {}
        self._admitting = 0  # taken off `waiting`, not yet running (counted as running)
        self.scoring = 0  # Score RPCs in progress (they share the request cap)
        self._score_tokens = 0  # their token budgets
        self._high: list[Job] = []
        self._low: list[Job] = []
        self._ids = itertools.count(1)
        self.accepting = True
        self.stopped = False

    # ------------------------------------------------------------ request threads
    def next_id(self) -> int:
        return next(self._ids)

    def add(self, seq: Sequence) -> None:
        with self.cond:
            self._check_room()
            self.waiting.append(seq)
            self.metrics.waiting.set(len(self.waiting))
            self.cond.notify_all()

    def _check_room(self) -> None:
        """Refuse a new request when the queue is full (caller holds cond)."""
        if not self.accepting:
            raise EngineStopped()
        running = len(self.running) + self._admitting
        cap = self.limits.max_running + self.limits.max_waiting
        if running + len(self.waiting) + self.scoring >= cap:
            raise QueueFull(
                "",
                f"queue full: {running} running, {len(self.waiting)} waiting, "
                f"{self.scoring} scoring (limits.max_running={self.limits.max_running}, "
                f"limits.max_waiting={self.limits.max_waiting})",
            )

    def begin_score(self, tokens: int = 0) -> None:
        """Count a Score RPC against the request cap and its `tokens` against the token budget."""
        with self.cond:
            self._check_room()
            self.scoring += 1
            self._score_tokens += tokens

    def end_score(self, tokens: int = 0) -> None:
        with self.cond:
            self.scoring -= 1
            self._score_tokens -= tokens
            self.cond.notify_all()

    def cancel(self, seq: Sequence, reason: str = CANCELLED) -> None:
        with self.cond:
            seq.cancel(reason)
            self.cond.notify_all()

    def cut(self, reason: str) -> None:
        """Every waiting and running request ends with `reason` at the engine's next iteration."""
        with self.cond:
            for seq in list(self.waiting) + list(self.running.values()):
                seq.cancel(reason)
            self.cond.notify_all()

    def submit_job(self, fn: Callable, high: bool = True) -> Future:
        fut: Future = Future()
        with self.cond:
            if self.stopped:
                fut.set_exception(EngineStopped())
                return fut
            (self._high if high else self._low).append((fn, fut))
            self.cond.notify_all()
        return fut

    def pending_low(self) -> int:
        return len(self._low)

    def stop_accepting(self) -> None:
        with self.cond:
            self.accepting = False
            self.cond.notify_all()

    def drain(self, timeout: float | None) -> bool:
        """Wait until no request is running or waiting; True when drained."""
        end = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.waiting or self.running:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(timeout=min(left, 0.05) if left is not None else 0.05)
        return True

    def stop(self) -> None:
        """Cancel everything; the engine thread's `wait_for_work` returns False."""
        with self.cond:
            self.accepting = False
            for seq in list(self.waiting) + list(self.running.values()):
                seq.cancel(CANCELLED)
            self.stopped = True
            self.cond.notify_all()

    def fail_jobs(self, exc_factory=EngineStopped) -> None:
        with self.cond:
            jobs, self._high, self._low = self._high + self._low, [], []
        for _, fut in jobs:
            if not fut.done():
                fut.set_exception(exc_factory())

    # ------------------------------------------------------------ the engine thread
    def wait_for_work(self, timeout: float | None = None, busy: Callable[[], bool] | None = None) -> bool:
        """Block until there is something to do, or `timeout` s passed; False once stopped. `busy()`: the
        runner has work of its own in flight (engine thread only), so do not block."""
        with self.cond:
            if busy is not None and busy():
                return not self.stopped
            if not (self.stopped or self.waiting or self.running or self._high or self._low):
                self.cond.wait_for(
                    lambda: self.stopped or self.waiting or self.running or self._high or self._low, timeout=timeout
                )
            return not self.stopped

    def leftovers(self) -> list[Sequence]:
        """After stop: every request not finished yet (the waiting ones leave the queue)."""
        with self.cond:
            out = list(self.waiting) + list(self.running.values())
            self.waiting.clear()
        return out

    def reap(self) -> list[tuple[Sequence, bool]]:
        """(request, was running) for every cancelled or expired request; waiting ones leave the queue."""
        now = time.monotonic()
        out = []
        with self.cond:
            for seq in list(self.waiting):
                if seq.deadline is not None and now >= seq.deadline:
                    seq.cancel(TIME_LIMIT)
                if seq.cancel_reason:
                    self.waiting.remove(seq)
                    out.append((seq, False))
            self.metrics.waiting.set(len(self.waiting))
            for seq in list(self.running.values()):
                if seq.deadline is not None and now >= seq.deadline:
                    seq.cancel(TIME_LIMIT)
                if seq.cancel_reason:
                    out.append((seq, True))
        return out

    def schedule(self) -> list[Sequence]:
        """The waiting requests that join the batch now (FIFO; slots and token budget); they count as
        running until `end_admission`."""
        budget = self.limits.max_batched_tokens
        with self.cond:
            room = self.limits.max_running - len(self.running)
            new = self.waiting[: max(room, 0)]
            if budget is not None:
                used = self._score_tokens + sum(s.budget for s in self.running.values())
                for k, seq in enumerate(new):
                    used += seq.budget
                    if used > budget and (k or self.running or self._score_tokens):  # alone it fits (parse)
                        new = new[:k]
                        break
            del self.waiting[: len(new)]
            self._admitting = len(new)
            self.metrics.waiting.set(len(self.waiting))
        return new

    def start_running(self, seq: Sequence, now: float) -> None:
        with self.cond:
            seq.admitted = now
            self.running[seq.seq_id] = seq
            self.metrics.running.set(len(self.running))

    def end_admission(self) -> None:
        with self.cond:
            self._admitting = 0

    def release(self, seq: Sequence) -> bool:
        """The request leaves the running set; True when it was running."""
        with self.cond:
            was = self.running.pop(seq.seq_id, None) is not None
            if was:
                self.metrics.running.set(len(self.running))
            self.cond.notify_all()
        return was

    def next_jobs(self, steps: int) -> list[Job]:
        """One high-priority job every iteration; one low-priority job when idle or every
        `lane_every_steps` decode steps."""
        out = []
        with self.cond:
            if self._high:
                out.append(self._high.pop(0))
            if self._low and ((not self.running and not self.waiting) or steps % self.lane_every_steps == 0):
                out.append(self._low.pop(0))
        return out
