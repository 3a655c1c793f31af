"""VLLMScorer: Score, prompt log-probs, the activation gate and the A/B re-scoring through the
serving vLLM engine, with no second copy of the large model.

Each scored row (prefix, continuation) enters vLLM's batch as a *forced-scoring* request
(`serve.vllm.engine.VLLMRunner.add_score`): the prompt is the prefix, and at its k-th sampled
position the sensepack processor records

    base_k   = log_softmax_U(z)[t_k]            packed_k = log_softmax_U(z + β·E·δ)[t_k]

from the row's raw logits z, then forces t_k (serve.vllm.core). So the numbers come from the same
logits, processor and Backpack state as generation (teacher forcing on the serving path), in
O(|U|) memory per row, batched with decoding by vLLM's own scheduler: a Score never stops decoding
for longer than one step. The cost is one decode step per continuation token instead of one
prefill (docs/vllm.md, "Score through the serving engine").

Pinned versions reach the processor as (name, version, β), as for generation. A version being gated
is not resident yet, so the scorer stages its edits in the in-process pack source for the duration
(`serve.vllm.resolver.PackManagerSource.stage`); processors in other processes read the store.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import torch

from serve.scoring import ScoreAbandoned, ScoreJob, TopLogprobs, settle


class VLLMScorer:
    concurrent = True  # rows are ordinary rows of vLLM's batch: a Score's continuations run together

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # serve.vllm.engine.VLLMEngine

    def _stage(self, packs) -> list:
        source = self.engine.runner.pack_source
        stage = getattr(source, "stage", None)
        if stage is None:
            return []
        staged = [(p.name, p.version) for p in packs]
        for p in packs:
            stage(p.name, p.version, p.edits)
        return staged

    def _unstage(self, staged) -> None:
        unstage = getattr(self.engine.runner.pack_source, "unstage", None)
        if unstage is not None:
            for name, version in staged:
                unstage(name, version)

    def _row(self, prefix: list[int], cont: list[int], packs, high: bool, done, top_n: int | None = None) -> str:
        """Queue one forced-scoring request (added to vLLM on the engine thread); `done(result, error)` is
        called once. Returns its request id."""
        runner = self.engine.runner
        rid = runner.new_score_id()
        staged = self._stage(packs)
        finished = threading.Event()

        def finish(result: Any, error: BaseException | None) -> None:
            if finished.is_set():  # once: the runner, a refusal or a failed engine job, whichever comes first
                return
            finished.set()
            self._unstage(staged)
            done(result, error)

        def add() -> None:
            try:
                runner.add_score(rid, list(prefix), list(cont), list(packs), finish, top_n)
            except BaseException as e:  # noqa: BLE001 - refused or dead: this score fails
                finish(None, e)

        def never_ran(f: Future) -> None:  # the engine stopped before the job ran
            if f.cancelled():
                finish(None, ScoreAbandoned())
            elif f.exception() is not None:
                finish(None, f.exception())

        self.engine.run_job(add, high).add_done_callback(never_ran)
        return rid

    def _cancel(self, rids: list[str]) -> None:
        runner = self.engine.runner

        def cancel() -> None:
            for rid in rids:
                runner.cancel_score(rid)

        self.engine.run_job(cancel, True)

    def score(self, prefix, cont, packs, want_base, want_packed, high: bool = True, top_n=None) -> ScoreJob:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()

        def done(result, error) -> None:
            if error is not None:
                settle(fut, error=error)
                return
            base, packed, top = result
            out: tuple = (
                torch.tensor(base, dtype=torch.float32) if want_base else None,
                torch.tensor(packed, dtype=torch.float32) if want_packed else None,
            )
            if top_n is not None:
                if top is None:
                    settle(fut, error=RuntimeError("forced scoring: the processor recorded no top tokens"))
                    return
                k = max((len(ids) for _, ids, _ in top), default=0)
                out += (
                    TopLogprobs(
                        torch.tensor([r for r, _, _ in top], dtype=torch.long),
                        torch.tensor([ids for _, ids, _ in top], dtype=torch.long).reshape(len(top), k),
                        torch.tensor([lps for _, _, lps in top], dtype=torch.float32).reshape(len(top), k),
                    ),
                )
            settle(fut, out)

        rid = self._row(prefix, cont, packs, high, done, top_n)
        return ScoreJob(fut, lambda: self._cancel([rid]))

    def paired_nll(self, rows, pack_ref, high: bool = True) -> ScoreJob:
        """Per-row summed NLL of tokens 1.. under base and pack: every row at once in vLLM's batch."""
        rows = [list(r) for r in rows if len(r) >= 2]
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        if not rows:
            fut.set_result(([], []))
            return ScoreJob(fut)
        base: list[float] = [0.0] * len(rows)
        packed: list[float] = [0.0] * len(rows)
        left = [len(rows)]
        lock = threading.Lock()

        def done_for(i: int):
            def done(result, error) -> None:
                with lock:
                    if error is not None:
                        if not fut.done():  # the other rows are of no use any more
                            self._cancel(rids)
                        settle(fut, error=error)
                        return
                    base[i], packed[i] = -sum(result[0]), -sum(result[1])
                    left[0] -= 1
                    if left[0] == 0:
                        settle(fut, (base, packed))

            return done

        rids: list[str] = []
        rids.extend(self._row(r[:1], r[1:], [pack_ref], high, done_for(i)) for i, r in enumerate(rows))
        return ScoreJob(fut, lambda: self._cancel(rids))
