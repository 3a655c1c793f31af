"""VLLMEngine: the serve engine surface (serve.engine.Engine) with vLLM doing the decoding.

Same public API and events as the embedded engine (submit / cancel / run_job / running / waiting
/ start / stop_accepting / drain / stop / pending_low / decode_steps), so the gRPC servicer,
metrics and pack pinning are unchanged. It subclasses serve.engine.Engine and reuses its token
acceptance (stop sequences, EOS / min tokens, text deltas, TTFT / ITL / e2e metrics, finish events)
and its job lanes; what differs:

* one engine thread steps ``vllm.LLMEngine`` (continuous batching is vLLM's): waiting requests are
  admitted with ``add_request`` while running slots are free, cancelled / deadline-exceeded /
  stop-sequence-finished ones are aborted with ``abort_request``;
* every request carries its pinned packs as ``SamplingParams.extra_args["sensepack"]`` (the pack
  manager pinned them at admission, exactly as for the embedded engine); the sensepack logits
  processor adds β·E·δ inside vLLM's sampler (``serve.vllm.processor``);
* the engine runs with ``logprobs_mode="processed_logprobs"``: logprobs returned to clients are the
  ensemble's (after the processor), not the base model's;
* in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the processor gets the Backpack and the
  pack manager's resident packs through ``serve.vllm.resolver.REGISTRY``; otherwise through
  ``additional_config={"sensepack": {"backpack": ..., "store": ...}}`` (docs/vllm.md).

``run_job`` jobs (Score, activation gate, A/B re-scoring) run on the engine thread between steps,
as in the embedded engine; they use the embedded ensemble (teacher-forced scoring cannot go
through vLLM processors: prompt logprobs skip them).
"""
from __future__ import annotations

import logging
import os
import time

from serve.engine import ERROR, REFUSED, Engine, Sequence

from . import V1_PROCESSOR_FQCN, V2_PROCESSOR_FQCN
from .args import build_extra_args
from .resolver import REGISTRY

log = logging.getLogger("sensepack.vllm.engine")


def engine_args_from_config(config, store_uri: str | None = None, model_folder: str | None = None,
                            vocab=None) -> dict:
    """vllm.EngineArgs fields from the server config's ``vllm`` section (docs/vllm.md, "Configuration").

    Reads the section with getattr defaults, so it works with any object of that shape. The model is
    ``vllm.model`` or else ``model.large_model`` (a hub id or folder vLLM can load); dtype follows
    ``model.dtype``. With ``vllm.multiprocessing`` (the default; required for tensor parallelism) the
    processors in vLLM's workers load the Backpack from ``model.backpack`` and packs from the store;
    ``vocab`` (the served ensemble.vocab.Vocabulary) tells them |U| without loading the tokenizer.
    """
    v = getattr(config, "vllm", None)
    g = (lambda name, default: getattr(v, name, default) if v is not None else default)
    m = config.model
    args = dict(
        model=model_folder or g("model", None) or m.large_model,
        tokenizer=m.tokenizer or None,
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
            raise ValueError("engine: vllm with model.profile: demo needs vllm.multiprocessing: false and one rank "
                             "(the demo Backpack lives only in the server process)")
        if not (model_folder or g("model", None)):
            raise ValueError("engine: vllm with model.profile: demo needs vllm.model: a folder vLLM can load")
    elif store_uri:    # for processors in other processes (mp executor, TP ranks); in-process ones use REGISTRY
        args["additional_config"] = {"sensepack": {"backpack": m.backpack, "store": str(store_uri),
                                                   "dtype": m.dtype}}
        if vocab is not None:
            args["additional_config"]["sensepack"]["vocab_size"] = vocab.size
    elif separate:
        raise ValueError("engine: vllm with vllm.multiprocessing or tensor parallelism needs store.uri: "
                         "the processors in vLLM's worker processes read pinned packs from the store")
    args.update(dict(g("engine_args", None) or {}))
    return args


class _Aborter:
    """Stands in for the embedded batch session: `remove` aborts the vLLM request."""

    def __init__(self, engine: "VLLMEngine"):
        self.engine = engine

    def remove(self, seq_id) -> None:
        self.engine._abort(seq_id)


class VLLMEngine(Engine):
    log_name = "vllm engine"
    def __init__(self, engine_args: dict, tokenizer, limits, metrics, backpack=None, pack_source=None,
                 ensemble=None, lane_every_steps: int = 8, v2_model_runner: bool | None = None,
                 in_process: bool | None = None):
        """engine_args: vllm.EngineArgs fields (model, dtype, tensor_parallel_size, gpu_memory_utilization,
        max_model_len, ...). backpack / pack_source: for the in-process registry (pack_source may be set
        later, before start(): the pack manager is usually built after the engine). ensemble: the
        embedded ensemble that Score / gate / A/B jobs use (optional). in_process: set
        VLLM_ENABLE_V1_MULTIPROCESSING before vLLM starts (None: leave the environment alone)."""
        super().__init__(ensemble, tokenizer, limits, metrics, lane_every_steps=lane_every_steps)
        self.engine_args = dict(engine_args)
        self.backpack = backpack
        self.pack_source = pack_source
        self.v2_model_runner = v2_model_runner
        self.in_process = in_process
        self.llm = None
        self._by_rid: dict[str, Sequence] = {}
        self._seen: dict[int, int] = {}          # seq_id -> tokens already accepted
        self._core_base = (0, 0, 0.0)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from vllm import EngineArgs, LLMEngine

        if self.in_process is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        if self.backpack is not None and self.pack_source is not None:
            REGISTRY.configure(self.backpack, self.pack_source, vocab_size=self.vocab.size)
        args = dict(self.engine_args)
        v2 = self.v2_model_runner
        if v2 is None:          # auto: the tested V1 runner unless the environment asks for MRV2
            v2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").lower() in ("1", "true")
        # the runner and the registered class must match (each loader rejects the other's class)
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if v2 else "0"
        args.setdefault("logits_processors", [V2_PROCESSOR_FQCN if v2 else V1_PROCESSOR_FQCN])
        args["logprobs_mode"] = "processed_logprobs"
        self.llm = LLMEngine.from_engine_args(EngineArgs(**args))
        self._session = _Aborter(self)
        import threading

        self._thread = threading.Thread(target=self._loop, name="sensepack-vllm-engine", daemon=True)
        self._thread.start()

    def _recover(self) -> None:
        """The vLLM engine keeps its own batch; the finished requests were aborted there."""

    def _sampling_params(self, seq: Sequence):
        from vllm import SamplingParams

        req = seq.req
        n_lp = max(req.top_n, 1) if (req.want_logprobs or req.top_n) else None
        kw = dict(max_tokens=req.max_new_tokens, min_tokens=req.min_new_tokens, ignore_eos=req.ignore_eos,
                  logprobs=n_lp, extra_args=build_extra_args(seq.packs, request_id=str(seq.req.request_id)),
                  stop_token_ids=sorted(req.stop_token_ids) or None, detokenize=False,
                  repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                  frequency_penalty=req.frequency_penalty, min_p=req.min_p, logit_bias=req.logit_bias or None)
        if req.greedy:
            kw.update(temperature=0.0)
        else:
            kw.update(temperature=req.temperature, top_k=req.top_k or 0, top_p=req.top_p, seed=seq.seed)
        return SamplingParams(**kw)

    def _admit_new(self, new: list[Sequence]) -> None:
        """The scheduler's admitted requests enter vLLM's batch; one it refuses ends alone."""
        from vllm.inputs import TokensPrompt

        now = time.monotonic()
        for seq in new:
            rid = f"sp-{seq.seq_id}"
            try:
                self.llm.add_request(rid, TokensPrompt(prompt_token_ids=list(seq.req.prompt_ids)),
                                     self._sampling_params(seq))
            except ValueError as e:   # vLLM refused this request (e.g. longer than vllm.max_model_len)
                log.warning("request refused by vLLM", extra={"event": "engine_add_failed"})
                self._finish(seq, REFUSED, error=f"{seq.req.input_field}: refused by the vLLM engine: {e}", admitted=False)
                continue
            except Exception as e:  # noqa: BLE001 - this request alone ends
                log.exception("vLLM add_request failed", extra={"event": "engine_add_failed"})
                self._finish(seq, ERROR, error=f"{type(e).__name__}: {e}", admitted=False)
                continue
            self._by_rid[rid] = seq
            self._seen[seq.seq_id] = 0
            seq.admitted = now
            self._running[seq.seq_id] = seq
            self.metrics.queue_time.observe(now - seq.arrival)
            self.metrics.prompt_tokens.inc(len(seq.req.prompt_ids))
        self.metrics.running.set(len(self._running))

    def _abort(self, seq_id) -> None:
        rid = f"sp-{seq_id}"
        self._seen.pop(seq_id, None)
        if self._by_rid.pop(rid, None) is not None and self.llm is not None:
            self.llm.abort_request([rid])

    def _core_stats(self) -> tuple[int, int, float]:
        """The processors' tracker counters (in-process mode; zeros when they live in other processes)."""
        skip = rep = 0
        secs = 0.0
        for p in REGISTRY.processors:
            st = p.core.tracker.stats
            skip += st.exact_skip_rows
            rep += st.window_reprefills
            secs += st.backpack_seconds
        return skip, rep, secs

    def _step(self) -> None:
        before = self._core_stats()
        outputs = self.llm.step()
        self._sync_core_stats(before)
        self.decode_steps += 1
        self._steps += 1
        now = time.monotonic()
        for out in outputs:
            seq = self._by_rid.get(out.request_id)
            if seq is None or seq.finished is not None:
                continue
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            start = self._seen.get(seq.seq_id, 0)
            for k in range(start, len(ids)):
                tok = int(ids[k])
                logprob, top = None, []
                lps = comp.logprobs[k] if comp.logprobs is not None and k < len(comp.logprobs) else None
                if lps:
                    if seq.req.want_logprobs and tok in lps:
                        logprob = float(lps[tok].logprob)
                    if seq.req.top_n:
                        ranked = sorted(((v.rank, t, float(v.logprob)) for t, v in lps.items() if v.rank is not None))
                        top = [(t, lp) for _, t, lp in ranked[: seq.req.top_n]]
                self._seen[seq.seq_id] = k + 1
                try:
                    self._accept(seq, tok, logprob, top, now)
                except Exception as e:  # noqa: BLE001 - this request alone ends
                    log.exception("accepting a token failed", extra={"event": "request_error"})
                    self._finish(seq, ERROR, error=f"{type(e).__name__}: {e}")
                if seq.finished is not None:
                    break
            if seq.finished is None and out.finished:
                # vLLM ended it (max_tokens / EOS) without our stop logic firing: should not happen since
                # _accept applies the same limits; finish it consistently anyway.
                eos = ids and ids[-1] == self.vocab.eos_id and not seq.req.ignore_eos
                reason = "EOS_TOKEN" if eos else "MAX_TOKENS"
                self._finish(seq, reason)
            if out.finished:
                self._by_rid.pop(out.request_id, None)

    def stop(self, drain_timeout: float | None = 0.0) -> None:
        super().stop(drain_timeout)
        if self.llm is not None:
            try:
                self.llm.engine_core.shutdown()
            except Exception:  # best effort: the process may be exiting
                log.exception("vllm shutdown failed", extra={"event": "engine_error"})
