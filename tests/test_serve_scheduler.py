"""serve.scheduler.Scheduler on its own: FIFO admission by running slots and by the batched-token budget
(Score requests included), the shared queue cap, reaping, and the job lanes. Each expectation is written
out by hand from the limits."""

from __future__ import annotations

import queue
import time

import pytest

from serve.config import LimitsConfig
from serve.errors import QueueFull, status_of
from serve.metrics import Metrics
from serve.params import GenerationRequest
from serve.sampling_params import SamplingParams
from serve.scheduler import CANCELLED, TIME_LIMIT, EngineStopped, Scheduler, Sequence


def _seq(sched, prompt=4, new=4, deadline=None):
    req = GenerationRequest(
        request_id="r", prompt_ids=[1] * prompt, packs=[], sampling=SamplingParams(max_new_tokens=new)
    )
    return Sequence(sched.next_id(), req, [], queue.Queue(), deadline=deadline)


def _admit(sched) -> list[int]:
    new = sched.schedule()
    for s in new:
        sched.start_running(s, time.monotonic())
    sched.end_admission()
    return [s.seq_id for s in new]


def test_fifo_by_running_slots():
    sched = Scheduler(LimitsConfig(max_running=2, max_waiting=8), Metrics())
    ids = [_seq(sched) for _ in range(5)]
    for s in ids:
        sched.add(s)
    assert _admit(sched) == [ids[0].seq_id, ids[1].seq_id]
    assert _admit(sched) == []  # no slot free
    assert sched.release(ids[0]) and not sched.release(ids[0])
    assert _admit(sched) == [ids[2].seq_id]  # first come, first served


def test_token_budget_counts_running_and_scores():
    # budgets: prompt + max_new_tokens = 10 each; 25 tokens leave room for two
    sched = Scheduler(LimitsConfig(max_running=8, max_waiting=8, max_batched_tokens=25), Metrics())
    seqs = [_seq(sched, prompt=6, new=4) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    assert _admit(sched) == [seqs[0].seq_id, seqs[1].seq_id]
    sched.release(seqs[0])
    sched.begin_score(tokens=10)  # a Score holds 10 tokens: 10 + 10 + 10 > 25
    assert _admit(sched) == []
    sched.end_score(tokens=10)
    assert _admit(sched) == [seqs[2].seq_id]
    big = _seq(sched, prompt=20, new=20)  # alone it exceeds the budget ...
    sched.add(big)
    assert _admit(sched) == []  # ... so it waits for an empty batch,
    sched.release(seqs[1])
    sched.release(seqs[2])
    assert _admit(sched) == [big.seq_id]  # where it runs alone (validation capped it)


def test_queue_cap_is_shared_and_stop_refuses():
    sched = Scheduler(LimitsConfig(max_running=1, max_waiting=1), Metrics())
    sched.add(_seq(sched))
    sched.begin_score()
    with pytest.raises(QueueFull) as ei:
        sched.add(_seq(sched))
    assert status_of(ei.value).grpc == "RESOURCE_EXHAUSTED"
    assert "0 running, 1 waiting, 1 scoring" in ei.value.message
    sched.end_score()
    sched.stop_accepting()
    with pytest.raises(EngineStopped):
        sched.add(_seq(sched))


def test_reap_cancelled_and_expired():
    sched = Scheduler(LimitsConfig(max_running=1, max_waiting=4), Metrics())
    running, cancelled, expired, fine = (
        _seq(sched),
        _seq(sched),
        _seq(sched, deadline=time.monotonic() - 1),
        _seq(sched),
    )
    for s in (running, cancelled, expired, fine):
        sched.add(s)
    _admit(sched)
    sched.cancel(cancelled)
    sched.cancel(running, TIME_LIMIT)
    got = {(s.seq_id, was_running, s.cancel_reason) for s, was_running in sched.reap()}
    assert got == {
        (running.seq_id, True, TIME_LIMIT),
        (cancelled.seq_id, False, CANCELLED),
        (expired.seq_id, False, TIME_LIMIT),
    }
    assert [s.seq_id for s in sched.waiting] == [fine.seq_id]


def test_job_lanes():
    sched = Scheduler(LimitsConfig(max_running=1, max_waiting=4), Metrics(), lane_every_steps=4)
    names = []
    for name, high in (("h1", True), ("h2", True), ("l1", False), ("l2", False)):
        sched.submit_job(lambda n=name: names.append(n), high)
    sched.add(_seq(sched))
    _admit(sched)  # busy: low jobs wait for every 4th step
    for steps in (1, 2, 3, 4):
        for fn, _fut in sched.next_jobs(steps):
            fn()
    assert names == ["h1", "h2", "l1"]
    sched.release(next(iter(sched.running.values())))
    for fn, _ in sched.next_jobs(5):  # idle: the low lane runs
        fn()
    assert names == ["h1", "h2", "l1", "l2"]
    sched.stop()
    assert sched.submit_job(lambda: None).exception(timeout=0) is not None
    assert not sched.wait_for_work(timeout=0)
