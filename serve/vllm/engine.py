"""VLLMEngine: the serve engine (serve.engine.Engine) with vLLM as its model runner.

`VLLMEngine` is `Engine` (the same scheduler, token acceptance with the incremental detokeniser,
stop sequences / EOS / min tokens, TTFT / ITL / e2e metrics, finish events, job lanes) composed
with a `VLLMRunner` instead of the embedded runner; it overrides nothing. What the runner does:

* `add` hands an admitted request to ``vllm.LLMEngine.add_request`` with its pinned packs as
  ``SamplingParams.extra_args["sensepack"]`` (the pack manager pinned them at admission, exactly as
  for the embedded engine); a request vLLM refuses (ValueError, e.g. longer than
  ``vllm.max_model_len``) raises `serve.engine.Refused` and ends alone with INVALID_ARGUMENT;
* `step` calls ``LLMEngine.step`` (continuous batching is vLLM's) and returns each request's new
  tokens with their log-probs; the sensepack logits processor added β·E·δ inside vLLM's sampler
  (``serve.vllm.processor``);
* `remove` aborts a request that finished on our side (cancelled, deadline, stop sequence);
* the engine runs with ``logprobs_mode="processed_logprobs"``: logprobs returned to clients are the
  ensemble's (after the processor), not the base model's;
* in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the processor gets the Backpack and the
  pack manager's resident packs through ``serve.vllm.resolver.REGISTRY``; otherwise through
  ``additional_config={"sensepack": {"backpack": ..., "store": ...}}`` (docs/vllm.md);
* when vLLM's engine core process dies (multi-process mode), `step` raises `serve.engine.RunnerDead`:
  running requests end UNAVAILABLE and the server goes NOT_SERVING and exits for its orchestrator.

Score, Generate's prompt log-probs, the activation gate and the A/B re-scoring go through the same
vLLM engine as *forced-scoring* requests (`add_score`, driven by serve.vllm.scoring.VLLMScorer): the
prompt is the prefix, the processor records each continuation token's base and packed log-prob and
forces that token (serve.vllm.core), and `step` collects the records through vLLM's RPC when vLLM
reports the request finished. No second copy of the large model is needed. While any is in flight
the runner is `busy()`, so the engine keeps stepping with no generation running.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ensemble.zoo import resolve_path
from serve.engine import CoreCounters, Engine, Refused, RowOutput, RunnerDead
from serve.errors import Unavailable
from serve.sampler import Sampled
from serve.scheduler import Sequence
from serve.scoring import ScoreAbandoned

from . import V1_PROCESSOR_FQCN, V2_PROCESSOR_FQCN, WORKER_EXTENSION_FQCN
from .args import ScoreSpec, build_extra_args
from .resolver import REGISTRY

log = logging.getLogger("sensepack.vllm.engine")


ScoreDone = Callable[[Any, BaseException | None], None]  # (([base...], [packed...]) or None, error or None)


def engine_args_from_config(config, store_uri: str | None = None, model_folder: str | None = None, vocab=None) -> dict:
    """vllm.EngineArgs fields from the server config's ``vllm`` section (docs/vllm.md, "Configuration").

    Reads the section with getattr defaults, so it works with any object of that shape. The model is
    ``vllm.model`` or else ``model.large_model`` (a hub id or folder vLLM can load); dtype follows
    ``model.dtype``. With ``vllm.multiprocessing`` (the default; required for tensor parallelism) the
    processors in vLLM's workers load the Backpack from ``model.backpack`` and packs from the store;
    ``vocab`` (the served ensemble.vocab.Vocabulary) tells them |U| without loading the tokenizer.
    """
    v = getattr(config, "vllm", None)

    def g(name, default):
        return getattr(v, name, default) if v is not None else default

    m = config.model

    def local(spec: str | None) -> str | None:  # registry names (smollm2-135m-instruct) -> their cached folders
        return None if spec is None else str(resolve_path(spec))

    args = dict(
        model=local(model_folder or g("model", None) or m.large_model),
        tokenizer=local(m.tokenizer or None),
        dtype=m.dtype,
        tensor_parallel_size=g("tensor_parallel_size", 1),
        pipeline_parallel_size=g("pipeline_parallel_size", 1),
        gpu_memory_utilization=g("gpu_memory_utilization", 0.85),
        max_num_seqs=g("max_num_seqs", None) or config.limits.max_running,
        max_model_len=g("max_model_len", None) or (config.limits.max_prompt_tokens + config.limits.max_new_tokens),
        # (serve.config.served_context caps requests at the same length: vLLM never sees a longer one)
        enforce_eager=g("enforce_eager", False),
        seed=g("seed", 0),
    )
    args = {k: val for k, val in args.items() if val is not None}
    separate = g("multiprocessing", True) or g("tensor_parallel_size", 1) > 1 or g("pipeline_parallel_size", 1) > 1
    if getattr(m, "profile", "pretrained") == "demo":
        # the demo Backpack exists only in the server's memory: processors must run in-process
        if separate:
            raise ValueError(
                "engine: vllm with model.profile: demo needs vllm.multiprocessing: false and one rank "
                "(the demo Backpack lives only in the server process)"
            )
        if not (model_folder or g("model", None)):
            raise ValueError("engine: vllm with model.profile: demo needs vllm.model: a folder vLLM can load")
    elif store_uri:  # for processors in other processes (mp executor, TP ranks); in-process ones use REGISTRY
        args["additional_config"] = {"sensepack": {"backpack": m.backpack, "store": str(store_uri), "dtype": m.dtype}}
        if vocab is not None:
            args["additional_config"]["sensepack"]["vocab_size"] = vocab.size
    elif separate:
        raise ValueError(
            "engine: vllm with vllm.multiprocessing or tensor parallelism needs store.uri: "
            "the processors in vLLM's worker processes read pinned packs from the store"
        )
    args.update(dict(g("engine_args", None) or {}))
    return args


def _engine_dead_errors() -> tuple[type, ...]:
    """vLLM's "the engine core process is gone" exceptions (0.32: EngineDeadError)."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError

        return (EngineDeadError,)
    except ImportError:  # pragma: no cover - other vLLM layouts
        return ()


def sampling_params(seq: Sequence):
    """vllm.SamplingParams of a request: the same sampling / stopping fields as the embedded sampler
    (serve.sampler), and its pinned packs for the sensepack processor."""
    return seq.req.sampling.to_vllm(seq.seed, build_extra_args(seq.packs, request_id=f"sp-{seq.seq_id}"))


def score_sampling_params(request_id: str, prefix_len: int, cont: list[int], packs, top_n: int | None = None):
    """vllm.SamplingParams of a forced-scoring request: greedy over the forced token, exactly len(cont)
    tokens, no EOS or stop handling (the continuation may contain EOS), no detokenisation."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=len(cont),
        min_tokens=0,
        ignore_eos=True,
        temperature=0.0,
        detokenize=False,
        extra_args=build_extra_args(packs, request_id=request_id, score=ScoreSpec(tuple(cont), prefix_len, top_n)),
    )


class VLLMRunner:
    """serve.engine.Runner over ``vllm.LLMEngine`` (see the module docstring)."""

    def __init__(
        self,
        engine_args: dict,
        vocab,
        backpack=None,
        pack_source=None,
        v2_model_runner: bool | None = None,
        in_process: bool | None = None,
    ):
        self.engine_args = dict(engine_args)
        self.vocab = vocab
        self.backpack = backpack
        self.pack_source = pack_source
        self.v2_model_runner = v2_model_runner
        self.in_process = in_process
        self.llm: Any = None  # vllm.LLMEngine once started (vLLM is imported lazily and untyped here)
        self._rids: dict[int, str] = {}  # seq_id -> vLLM request id (live in vLLM)
        self._seen: dict[int, int] = {}  # seq_id -> tokens already returned
        self._dead_errors: tuple[type[BaseException], ...] = ()
        self._finished: list[str] = []  # vLLM ids finished since the last sync (processors forget them)
        self._last = CoreCounters()
        self._synced_at = float("-inf")
        self.parked = 0  # parked Backpack states in the processors (last sync)
        self.sync_interval_s = 0.5
        self._closing = threading.Event()
        self._sync_off = False
        self._refusals: tuple[type[BaseException], ...] = (ValueError,)
        self._scores: dict[str, ScoreDone] = {}  # forced-scoring requests in vLLM: id -> completion callback
        self._score_ids = itertools.count()

    @staticmethod
    def rid(seq_id: int) -> str:
        return f"sp-{seq_id}"

    # ------------------------------------------------------------ forced scoring (engine thread only)
    def new_score_id(self) -> str:
        return f"sc-{next(self._score_ids)}"

    def add_score(
        self, rid: str, prefix: list[int], cont: list[int], packs, done: ScoreDone, top_n: int | None = None
    ) -> None:
        """Enter a forced-scoring request; `done` is called from `step` once vLLM finishes it (or on failure)."""
        self._add_request(rid, prefix, score_sampling_params(rid, len(prefix), cont, packs, top_n))
        self._scores[rid] = done

    def cancel_score(self, rid: str) -> None:
        done = self._scores.pop(rid, None)
        if done is None:
            return
        if self.llm is not None:
            self.llm.abort_request([rid])
        self._finished.append(rid)  # the processors drop its record
        done(None, ScoreAbandoned())

    def busy(self) -> bool:
        """Forced-scoring requests are in flight: keep stepping even with no generation running."""
        return bool(self._scores)

    def _collect_scores(self, ids: list[str]) -> None:
        try:
            res = self.llm.collective_rpc("sensepack_take_scores", args=(ids,))
        except Exception as e:
            if self._dead(e):
                raise RunnerDead(f"vLLM engine core: {e}") from e
            log.exception("sensepack_take_scores failed", extra={"event": "engine_error"})
            for rid in ids:
                self._scores.pop(rid)(None, RuntimeError(f"forced scoring: the records could not be read: {e}"))
            return
        got: dict = {}  # tensor-parallel ranks record the same; with pipeline parallelism only the last stage
        for rank in reversed(res or []):  # samples, so take each id from whichever rank has it
            got.update(rank)
        for rid in ids:
            done = self._scores.pop(rid)
            rec = got.get(rid)
            if rec is None:
                done(None, RuntimeError("forced scoring: the processor kept no record (evicted, or no processor)"))
            elif "error" in rec:
                done(None, RuntimeError(f"forced scoring: {rec['error']}"))
            else:
                done((rec["base"], rec["packed"], rec.get("top")), None)

    def abandon(self, why: str) -> None:
        """The runner is dead or shutting down: every forced-scoring request fails UNAVAILABLE."""
        scores, self._scores = self._scores, {}
        for done in scores.values():
            done(None, Unavailable("", f"the model runner died ({why}); retry"))

    def start(self) -> None:
        from vllm import EngineArgs, LLMEngine

        if self.in_process is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        if self.backpack is not None and self.pack_source is not None:
            REGISTRY.configure(self.backpack, self.pack_source, vocab_size=self.vocab.size)
        args = dict(self.engine_args)
        v2 = self.v2_model_runner
        if v2 is None:  # auto: the tested V1 runner unless the environment asks for MRV2
            v2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").lower() in ("1", "true")
        # the runner and the registered class must match (each loader rejects the other's class)
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if v2 else "0"
        args.setdefault("logits_processors", [V2_PROCESSOR_FQCN if v2 else V1_PROCESSOR_FQCN])
        args["logprobs_mode"] = "processed_logprobs"
        args.setdefault("worker_extension_cls", WORKER_EXTENSION_FQCN)  # counters / finished ids via collective_rpc
        self.llm = LLMEngine.from_engine_args(EngineArgs(**args))
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":
            self.sync_interval_s = 0.0  # a plain call: every step
        else:
            self._watchdog = threading.Thread(target=self._watch, name="sensepack-vllm-watchdog", daemon=True)
            self._watchdog.start()
        self._dead_errors = _engine_dead_errors()
        from vllm.exceptions import VLLMClientError  # 0.32: VLLMValidationError (not a ValueError) for bad input

        self._refusals = (ValueError, VLLMClientError)

    def _dead(self, e: BaseException) -> bool:
        return bool(self._dead_errors) and isinstance(e, self._dead_errors)

    def _add_request(self, rid: str, prompt_ids, params) -> None:
        """`LLMEngine.add_request`: Refused when vLLM refuses this request (e.g. longer than vllm.max_model_len),
        RunnerDead when its engine core is gone."""
        from vllm.inputs import TokensPrompt

        try:
            self.llm.add_request(rid, TokensPrompt(prompt_token_ids=list(prompt_ids)), params)
        except self._refusals as e:
            raise Refused(f"refused by the vLLM engine: {e}") from None
        except Exception as e:
            if self._dead(e):
                raise RunnerDead(f"vLLM engine core: {e}") from e
            raise

    def add(self, seq: Sequence) -> None:
        rid = self.rid(seq.seq_id)
        self._add_request(rid, seq.req.prompt_ids, sampling_params(seq))
        self._rids[seq.seq_id] = rid
        self._seen[seq.seq_id] = 0

    def remove(self, seq_id: int) -> None:
        self._seen.pop(seq_id, None)
        rid = self._rids.pop(seq_id, None)
        if rid is not None and self.llm is not None:
            self.llm.abort_request([rid])
            self._finished.append(rid)

    def step(self, running: dict[int, Sequence]) -> list[RowOutput]:
        try:
            outputs = self.llm.step()
        except Exception as e:
            if self._dead(e):
                self.abandon(str(e))
                raise RunnerDead(f"vLLM engine core: {e}") from e
            raise
        by_rid = {rid: sid for sid, rid in self._rids.items()}
        result = []
        scored = []
        for out in outputs:
            if out.request_id in self._scores:
                if out.finished:
                    scored.append(out.request_id)
                    self._finished.append(out.request_id)
                continue
            sid = by_rid.get(out.request_id)
            if sid is None:
                continue
            seq = running.get(sid)
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            start = self._seen.get(sid, 0)
            row = RowOutput(sid, finished=bool(out.finished))
            for k in range(start, len(ids)):
                tok = int(ids[k])
                logprob, top = None, []
                lps = comp.logprobs[k] if comp.logprobs is not None and k < len(comp.logprobs) else None
                if lps and seq is not None:
                    if seq.req.sampling.want_logprobs and tok in lps:
                        logprob = float(lps[tok].logprob)
                    if seq.req.sampling.top_n:
                        ranked = sorted(((v.rank, t, float(v.logprob)) for t, v in lps.items() if v.rank is not None))
                        top = [(t, lp) for _, t, lp in ranked[: seq.req.sampling.top_n]]
                row.tokens.append(Sampled(tok, logprob, top))
            self._seen[sid] = len(ids)
            if out.finished:  # gone from vLLM: nothing to abort
                self._rids.pop(sid, None)
                self._seen.pop(sid, None)
                self._finished.append(out.request_id)
            result.append(row)
        if scored:
            try:
                self._collect_scores(scored)
            except RunnerDead as e:
                self.abandon(str(e))
                raise
        return result

    def recover(self) -> None:
        """vLLM keeps its own batch; the finished requests were aborted there."""

    def counters(self, idle: bool) -> CoreCounters:
        """The processors' counters through vLLM's RPC to its workers (serve.vllm.worker), which also hands
        them the finished request ids (their parked Backpack states go). In-process every step; across
        processes at most every `sync_interval_s`, and when the batch empties."""
        now = time.monotonic()
        if self._sync_off or (not idle and now - self._synced_at < self.sync_interval_s):
            return self._last  # totals unchanged, no new per-step samples
        finished, self._finished = self._finished, []
        try:
            res = self.llm.collective_rpc("sensepack_sync", args=(finished,))
        except Exception as e:
            if self._dead(e):
                raise RunnerDead(f"vLLM engine core: {e}") from e
            # e.g. engine_args set another worker_extension_cls: the metrics stay where they are, said once
            log.exception(
                "sensepack_sync failed: processor metrics are no longer exported", extra={"event": "engine_error"}
            )
            self._sync_off = True
            return self._last
        self._synced_at = now
        # tensor-parallel ranks run the same processor on the same batch; under pipeline parallelism only the
        # last stage samples, and vLLM lists workers by global rank (pp_rank * tp_size + tp_rank): the last speaks
        c = res[-1] if res else {}
        fresh = CoreCounters(
            c.get("exact_skip_rows", 0),
            c.get("window_reprefills", 0),
            c.get("backpack_seconds", 0.0),
            c.get("resumed", 0),
            step_seconds=list(c.get("step_seconds", ())),
        )
        self._last = replace(fresh, step_seconds=[])
        self.parked = c.get("parked", 0)
        return fresh

    def _watch(self) -> None:
        """Wake a `step` blocked on a dead engine core. vLLM 0.32's monitor marks the client dead when the
        engine-core process exits, but a sync client's `get_output` waiting on its queue is not woken (the
        output thread just stops), so the engine thread would wait forever: give it vLLM's own error."""
        while not self._closing.wait(0.5):
            if self.dead():
                q = getattr(self.llm.engine_core, "outputs_queue", None)
                if q is not None and self._dead_errors:
                    q.put_nowait(self._dead_errors[0]())
                return

    def dead(self) -> str | None:
        """vLLM's client marks its engine dead when the engine core process exits (its monitor thread)."""
        res = getattr(getattr(self.llm, "engine_core", None), "resources", None)
        return "vLLM engine core process exited" if getattr(res, "engine_dead", False) else None

    def shutdown(self) -> None:
        self._closing.set()
        self.abandon("the engine shut down")
        if self.llm is not None:
            self.llm.engine_core.shutdown()


class VLLMEngine(Engine):
    """`Engine` with a `VLLMRunner` (nothing overridden)."""

    runner: VLLMRunner

    log_name = "vllm engine"

    def __init__(
        self,
        engine_args: dict,
        tokenizer,
        limits,
        metrics,
        backpack=None,
        pack_source=None,
        vocab=None,
        lane_every_steps: int = 8,
        v2_model_runner: bool | None = None,
        in_process: bool | None = None,
    ):
        """engine_args: vllm.EngineArgs fields (model, dtype, tensor_parallel_size, gpu_memory_utilization,
        max_model_len, ...). backpack / pack_source: for the in-process registry (pack_source may be set
        later, before start(): the pack manager is usually built after the engine). vocab: the served
        ensemble.vocab.Vocabulary (default: from the tokenizer). No embedded ensemble: Score, the gate
        and A/B go through vLLM (serve.vllm.scoring). in_process: set VLLM_ENABLE_V1_MULTIPROCESSING
        before vLLM starts (None: leave the environment alone)."""
        from ensemble.vocab import Vocabulary

        vocab = vocab if vocab is not None else Vocabulary.from_tokenizer(tokenizer)
        runner = VLLMRunner(
            engine_args,
            vocab,
            backpack=backpack,
            pack_source=pack_source,
            v2_model_runner=v2_model_runner,
            in_process=in_process,
        )
        super().__init__(
            None, tokenizer, limits, metrics, lane_every_steps=lane_every_steps, runner=runner, vocab=vocab
        )

    # the server fills these in after building the engine (the pack manager needs the engine first)
    @property
    def engine_args(self) -> dict:
        return self.runner.engine_args

    @engine_args.setter
    def engine_args(self, value: dict) -> None:
        self.runner.engine_args = dict(value)

    @property
    def pack_source(self):
        return self.runner.pack_source

    @pack_source.setter
    def pack_source(self, value) -> None:
        self.runner.pack_source = value

    @property
    def llm(self):
        return self.runner.llm
