"""Reaching the sensepack processors inside vLLM's workers (any process layout).

`SensepackWorkerExtension` is mixed into vLLM's worker class (``EngineArgs.worker_extension_cls``,
set by `serve.vllm.engine.VLLMRunner`), so the server calls it through vLLM's own RPC,
``LLMEngine.collective_rpc("sensepack_sync", args=(finished_ids,))``: in-process that is a plain
call; with vLLM's engine core and workers in other processes it crosses vLLM's IPC. One call:

* tells every processor which requests finished (their parked Backpack states go at once, see
  `serve.vllm.core.EnsembleLogitsCore.forget`);
* returns the processors' counters, so the server's /metrics shows the Backpack time, exact skips,
  window re-prefills and resumed re-adds of processors that live in worker processes.

``collective_rpc("sensepack_take_scores", args=(ids,))`` hands back the forced-scoring records of
finished score requests (serve.vllm.scoring), the same way.

Every tensor-parallel rank runs the same processor on the same batch; under pipeline parallelism only the
last stage samples. The server reads the counters of the last worker (the last stage) and takes each score
record from whichever worker holds it.
This module imports no vLLM.
"""

from __future__ import annotations

from typing import Any

from .resolver import REGISTRY


def processor_counters(processors, finished=()) -> dict:
    """Forget `finished` request ids in every processor; return their summed counters and drain their
    per-step Backpack times."""
    out: dict[str, Any] = dict(
        exact_skip_rows=0, window_reprefills=0, backpack_seconds=0.0, resumed=0, parked=0, step_seconds=[]
    )
    for p in processors:
        core = p.core
        for rid in finished:
            core.forget(rid)
        st = core.tracker.stats
        out["exact_skip_rows"] += st.exact_skip_rows
        out["window_reprefills"] += st.window_reprefills
        out["backpack_seconds"] += st.backpack_seconds
        out["resumed"] += core.stats.resumed
        out["parked"] += core.parked
        samples = core.step_seconds  # bounded deque: older samples drop when nobody syncs
        while samples:
            out["step_seconds"].append(samples.popleft())
    return out


def take_scores(processors, request_ids) -> dict:
    """The forced-scoring records of `request_ids` (serve.vllm.core.EnsembleLogitsCore.take_scores)."""
    out: dict = {}
    for p in processors:
        out.update(p.core.take_scores(request_ids))
    return out


class SensepackWorkerExtension:
    """Methods vLLM adds to its worker class (names prefixed: they must not clash with the worker's)."""

    def _sensepack_processors(self) -> list:
        # in-process, several engines may share REGISTRY: only this worker's processors (same vllm_config)
        mine = [p for p in REGISTRY.processors if getattr(p, "vllm_config", None) is getattr(self, "vllm_config", 0)]
        return mine or REGISTRY.processors

    def sensepack_sync(self, finished: list[str] | tuple = ()) -> dict:
        return processor_counters(self._sensepack_processors(), finished)

    def sensepack_take_scores(self, request_ids: list[str] | tuple = ()) -> dict:
        return take_scores(self._sensepack_processors(), request_ids)
