"""The gRPC server: generation and admin servicers, health, reflection,
/metrics, TLS, graceful shutdown.

    server = SensepackServer(config).start()    # binds, warms up, SERVING
    ...
    server.stop()                               # drains running requests

Tests and benchmarks pass a pre-built `Served` (models) to share one model
across servers.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sensepack_proto import ADMIN_SERVICE, GENERATION_SERVICE, admin_pb, admin_pb_grpc, pb, pb_grpc
from serve import engine as eng
from serve.abtest import Gate, LiveMonitor
from serve.auth import AdminAuthInterceptor
from serve.config import Config, served_context
from serve.metrics import Metrics, method_label
from serve.models import Served, build_served, expectations, open_pack_store
from serve.packs import PackManager
from serve.params import RequestError, parse_generate, parse_pack_ref, parse_score
from serve.scoring import ScoreAbandoned, advance, score_row, score_steps

log = logging.getLogger("sensepack.server")

SERVER_VERSION = "0.1.0"
_STOP = {eng.MAX_TOKENS: pb.MAX_TOKENS, eng.EOS_TOKEN: pb.EOS_TOKEN, eng.STOP_SEQUENCE: pb.STOP_SEQUENCE,
         eng.CANCELLED: pb.CANCELLED, eng.TIME_LIMIT: pb.TIME_LIMIT, eng.ERROR: pb.ERROR,
         eng.REFUSED: pb.ERROR, eng.SHUTDOWN: pb.CANCELLED, eng.STOP_TOKEN: pb.STOP_TOKEN}
_FAIL = {eng.CANCELLED: grpc.StatusCode.CANCELLED, eng.TIME_LIMIT: grpc.StatusCode.DEADLINE_EXCEEDED,
         eng.ERROR: grpc.StatusCode.INTERNAL, eng.REFUSED: grpc.StatusCode.INVALID_ARGUMENT,
         eng.SHUTDOWN: grpc.StatusCode.UNAVAILABLE}


def _time_left(context) -> float | None:
    left = context.time_remaining()
    return None if left is None or left > 1e7 else max(left, 0.0)


def _deadline(context) -> float | None:
    left = _time_left(context)
    return None if left is None else time.monotonic() + left


def _ended_reason(seq) -> str:
    """Why an RPC ended early: its deadline (with a little slack for clock skew) or a cancel."""
    if seq.deadline is not None and time.monotonic() >= seq.deadline - 0.05:
        return eng.TIME_LIMIT
    return eng.CANCELLED


class _Tracked:
    """Records sensepack_requests_total{method,status} exactly once per RPC."""

    def __init__(self, metrics: Metrics, method: str):
        self.metrics, self.method, self.done = metrics, method, False

    def record(self, code: grpc.StatusCode) -> None:
        if not self.done:
            self.done = True
            self.metrics.requests.labels(self.method, code.name).inc()


class Undecodable:
    """What the decode guard hands a servicer for request bytes that are not a valid message."""

    def __init__(self, error: str):
        self.error = error


def _check_decoded(request, context, tracked: _Tracked) -> None:
    if isinstance(request, Undecodable):
        tracked.record(grpc.StatusCode.INVALID_ARGUMENT)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message ({request.error})")


class DecodeGuard(grpc.ServerInterceptor):
    """Undecodable request bytes (e.g. invalid UTF-8 in a string field) reach the servicer as
    `Undecodable`, which answers INVALID_ARGUMENT and counts it, instead of grpc's uncounted INTERNAL."""

    def __init__(self, services: tuple[str, ...]):
        self._prefixes = tuple(f"/{s}/" for s in services)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (handler is None or not handler_call_details.method.startswith(self._prefixes)
                or handler.request_deserializer is None or not hasattr(handler, "_replace")):
            return handler
        decode = handler.request_deserializer

        def guarded(data: bytes):
            try:
                return decode(data)
            except Exception as e:  # noqa: BLE001 - any decode failure is the client's
                return Undecodable(f"{type(e).__name__}: {e}")

        return handler._replace(request_deserializer=guarded)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, srv: "SensepackServer"):
        self.srv = srv

    # ---- helpers
    def _pack_used(self, admission) -> list:
        return [pb.PackUsed(ref=p.request.ref, name=p.name, version=p.version, beta=p.beta if p.resident else 0.0,
                            arm=p.arm) for p in admission.pins]

    def _token_info(self, ev: eng.TokenEvent, req) -> pb.TokenInfo:
        tok = self.srv.tokenizer
        info = pb.TokenInfo(id=ev.token_id, text=tok.decode([ev.token_id]))
        if ev.logprob is not None:
            info.logprob = ev.logprob
        for i, lp in ev.top:
            info.top_tokens.add(id=i, text=tok.decode([i]), logprob=lp)
        return info

    def _admit(self, request, context, tracked):
        s = self.srv
        req = parse_generate(request, s.tokenizer, s.cfg.limits, s.context_len, s.vocab)
        admission = s.packs.admit(req.packs, req.ab_key, deadline=_deadline(context))
        monitor = s.monitor

        def on_finish(seq, reason):
            admission.release()
            if monitor is not None and reason in (eng.MAX_TOKENS, eng.EOS_TOKEN, eng.STOP_SEQUENCE):
                monitor.on_finished(admission.pins, seq.req.prompt_ids, seq.output_ids)

        try:
            seq = s.engine.submit(req, admission.pack_refs, _deadline(context), on_finish=on_finish, user=admission)
        except BaseException:
            admission.release()
            raise
        context.add_callback(lambda: s.engine.cancel(seq, _ended_reason(seq)))
        return req, admission, seq

    def _events(self, seq, context):
        while True:
            try:
                ev = seq.events.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    self.srv.engine.cancel(seq, _ended_reason(seq))
                continue
            yield ev
            if isinstance(ev, eng.FinishEvent):
                return

    def _fail(self, context, tracked, err: RequestError):
        tracked.record(err.code)
        context.abort(err.code, err.message)

    def _internal(self, context, tracked, err: Exception):
        log.exception("request failed", extra={"event": "internal_error", "method": tracked.method})
        tracked.record(grpc.StatusCode.INTERNAL)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")

    # ---- RPCs
    def _start(self, request, context, tracked):
        """Admit the request; the response head every Generate / GenerateStream reply starts with."""
        try:
            req, admission, seq = self._admit(request, context, tracked)
        except RequestError as e:
            self._fail(context, tracked, e)
        except Exception as e:  # noqa: BLE001 - reported as INTERNAL, counted, logged
            self._internal(context, tracked, e)
        head = pb.GenerateResponse(request_id=req.request_id, input_token_count=len(req.prompt_ids))
        if req.want_input_tokens:
            head.input_token_ids.extend(req.prompt_ids)
        if req.want_prompt_logprobs and len(req.prompt_ids) > 1:
            head.prompt_logprobs.extend(self._prompt_logprobs(req, admission, seq, context, tracked))
        head.packs.extend(self._pack_used(admission))
        if seq.seed is not None:
            head.seed = seq.seed
        return req, seq, head

    def _prompt_logprobs(self, req, admission, seq, context, tracked) -> list[float]:
        """log p(prompt[i] | prompt[<i]), i >= 1, under the served distribution (the pinned packs)."""
        s = self.srv
        refs = admission.pack_refs
        fut = s.engine.run_job(lambda: score_row(s.ensemble, req.prompt_ids[:1], req.prompt_ids[1:], refs,
                                                 want_base=not refs, want_packed=bool(refs)))
        try:
            base, packed = fut.result(timeout=_time_left(context))
        except futures.TimeoutError:
            fut.cancel()
            s.engine.cancel(seq, eng.TIME_LIMIT)
            tracked.record(grpc.StatusCode.DEADLINE_EXCEEDED)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "response.prompt_logprobs: deadline exceeded")
        return (packed if refs else base).double().tolist()

    def _abort_if_failed(self, context, tracked, ev: eng.FinishEvent) -> None:
        if ev.reason not in _FAIL:
            return
        tracked.record(_FAIL[ev.reason])
        if ev.reason == eng.REFUSED:        # the error names the refused field
            msg = ev.error
        elif ev.reason == eng.SHUTDOWN:
            msg = f"server shutting down: the request was cut after {len(ev.output_ids)} tokens; retry"
        else:
            msg = (f"generation {ev.reason.lower()}" + (f": {ev.error}" if ev.error else "")
                   + f" after {len(ev.output_ids)} tokens")
        context.abort(_FAIL[ev.reason], msg)

    def Generate(self, request, context):
        tracked = _Tracked(self.srv.metrics, "Generate")
        _check_decoded(request, context, tracked)
        req, seq, resp = self._start(request, context, tracked)
        for ev in self._events(seq, context):
            if isinstance(ev, eng.TokenEvent):
                if req.want_tokens:
                    resp.tokens.append(self._token_info(ev, req))
                continue
            self._abort_if_failed(context, tracked, ev)
            if ev.last is not None and req.want_tokens:
                resp.tokens.append(self._token_info(ev.last, req))
            resp.text = ev.text
            resp.generated_token_count = len(ev.output_ids)
            resp.stop_reason = _STOP[ev.reason]
            resp.stop_sequence = ev.stop_sequence
        tracked.record(grpc.StatusCode.OK)
        return resp

    def GenerateStream(self, request, context):
        tracked = _Tracked(self.srv.metrics, "GenerateStream")
        _check_decoded(request, context, tracked)
        req, seq, first = self._start(request, context, tracked)
        yield first
        try:
            for ev in self._events(seq, context):
                if isinstance(ev, eng.TokenEvent):
                    msg = pb.GenerateResponse(request_id=req.request_id, text=ev.text_delta,
                                              generated_token_count=ev.generated)
                    if req.want_tokens:
                        msg.tokens.append(self._token_info(ev, req))
                    yield msg
                    continue
                self._abort_if_failed(context, tracked, ev)
                tracked.record(grpc.StatusCode.OK)
                msg = pb.GenerateResponse(request_id=req.request_id, text=ev.text_delta,
                                          generated_token_count=len(ev.output_ids), stop_reason=_STOP[ev.reason],
                                          stop_sequence=ev.stop_sequence)
                if ev.last is not None and req.want_tokens:
                    msg.tokens.append(self._token_info(ev.last, req))
                yield msg
        finally:
            if not tracked.done:       # the consumer went away (cancel / deadline): free the slot now
                reason = _ended_reason(seq)
                self.srv.engine.cancel(seq, reason)
                tracked.record(_FAIL[reason])

    def Score(self, request, context):
        s = self.srv
        tracked = _Tracked(s.metrics, "Score")
        _check_decoded(request, context, tracked)
        try:
            req = parse_score(request, s.tokenizer, s.cfg.limits, s.context_len, s.vocab)
            admission = s.packs.admit(req.packs, ab_key="", deadline=_deadline(context))
        except RequestError as e:
            self._fail(context, tracked, e)
        except Exception as e:  # noqa: BLE001 - reported as INTERNAL, counted, logged
            self._internal(context, tracked, e)
        try:
            base, packed = self._score_rows(req, admission, context, tracked)
        finally:
            admission.release()
        resp = pb.ScoreResponse(request_id=req.request_id, prefix_token_count=len(req.prefix_ids))
        resp.packs.extend(self._pack_used(admission))
        for i, ids in enumerate(req.continuations):
            c = resp.continuations.add(token_ids=ids, tokens=[s.tokenizer.decode([t]) for t in ids])
            if req.include_base:
                v = base[i].double()
                c.base.token_logprobs.extend(v.tolist())
                c.base.total_logprob = float(v.sum())
            if req.packs:
                v = packed[i].double()
                c.packed.token_logprobs.extend(v.tolist())
                c.packed.total_logprob = float(v.sum())
        s.metrics.prompt_tokens.inc(len(req.prefix_ids) + sum(map(len, req.continuations)))
        tracked.record(grpc.StatusCode.OK)
        return resp

    def _score_rows(self, req, admission, context, tracked):
        """One engine job per step of serve.scoring (a continuation's forward pass, then each chunk of
        positions; decode steps run in between), in bounded memory; a cancel or the deadline stops it
        between chunks. Counted by admission."""
        s = self.srv
        refs = [p.resident.pack_ref(p.beta) for p in admission.pins if p.resident is not None]
        deadline = _deadline(context)
        abandoned = threading.Event()
        context.add_callback(abandoned.set)

        def should_stop():
            if abandoned.is_set() or (deadline is not None and time.monotonic() >= deadline):
                raise ScoreAbandoned()

        tokens = len(req.prefix_ids) + max(map(len, req.continuations))    # one continuation at a time
        try:
            s.engine.begin_score(tokens)
        except RequestError as e:
            self._fail(context, tracked, e)
        base, packed = [], []
        try:
            for cont in req.continuations:
                steps = score_steps(s.ensemble, req.prefix_ids, cont, refs, req.include_base, bool(req.packs),
                                    should_stop)
                try:
                    done = False
                    while not done:     # one engine job per step: decode steps run between the chunks
                        fut = s.engine.run_job(lambda: advance(steps))
                        done, out = fut.result(timeout=None if deadline is None
                                               else max(deadline - time.monotonic(), 0))
                    b, p = out
                except (futures.TimeoutError, ScoreAbandoned):
                    abandoned.set()
                    fut.cancel()
                    code = grpc.StatusCode.DEADLINE_EXCEEDED if context.is_active() else grpc.StatusCode.CANCELLED
                    tracked.record(code)
                    context.abort(code, f"score: {'deadline exceeded' if context.is_active() else 'cancelled'} "
                                        f"after {len(base) or len(packed)} of {len(req.continuations)} continuations")
                except RequestError as e:
                    self._fail(context, tracked, e)
                except Exception as e:  # noqa: BLE001
                    self._internal(context, tracked, e)
                base.append(b)
                packed.append(p)
        finally:
            s.engine.end_score(tokens)
        return base, packed

    def Tokenize(self, request, context):
        s = self.srv
        tracked = _Tracked(s.metrics, "Tokenize")
        _check_decoded(request, context, tracked)
        if len(request.text) > 1_000_000:
            self._fail(context, tracked, RequestError(grpc.StatusCode.INVALID_ARGUMENT, "text",
                                                      "longer than 1000000 characters"))
        ids = s.tokenizer(request.text, add_special_tokens=False)["input_ids"] if request.text else []
        resp = pb.TokenizeResponse(token_ids=ids, token_count=len(ids))
        if request.return_tokens:
            resp.tokens.extend(s.tokenizer.convert_ids_to_tokens(ids))
        tracked.record(grpc.StatusCode.OK)
        return resp

    def ModelInfo(self, request, context):
        s = self.srv
        tracked = _Tracked(s.metrics, "ModelInfo")
        _check_decoded(request, context, tracked)
        resp = s.model_info()
        tracked.record(grpc.StatusCode.OK)
        return resp


class AdminServicer(admin_pb_grpc.PackAdminServicer):
    def __init__(self, srv: "SensepackServer"):
        self.srv = srv

    def _resident(self, r) -> admin_pb.ResidentPack:
        m = self.srv.packs
        out = admin_pb.ResidentPack(name=r.name, version=r.version, calibrated_beta=r.calibrated_beta,
                                    epsilon=r.epsilon, state=m.state_of(r), routes=m.routes_of(r),
                                    running_requests=r.refcount)
        if r.gate is not None:
            out.gate_ratio = r.gate.ratio
        return out

    def _gate(self, r) -> admin_pb.GateResult:
        g = r.gate
        if g is None:
            return admin_pb.GateResult(passed=True, skipped=True, beta=r.calibrated_beta, epsilon=r.epsilon)
        return admin_pb.GateResult(passed=g.passed, ratio=g.ratio, epsilon=g.epsilon, beta=g.beta, tokens=g.tokens)

    def _call(self, method, request, context, fn):
        tracked = _Tracked(self.srv.metrics, method)
        _check_decoded(request, context, tracked)
        try:
            out = fn()
        except RequestError as e:
            tracked.record(e.code)
            context.abort(e.code, e.message)
        except Exception as e:
            from edits_store.errors import PackError

            if isinstance(e, PackError):
                code = getattr(grpc.StatusCode, e.status, grpc.StatusCode.INVALID_ARGUMENT)
                tracked.record(code)
                context.abort(code, str(e))
            raise
        tracked.record(grpc.StatusCode.OK)
        return out

    def ListPacks(self, request, context):
        def fn():
            m = self.srv.packs
            resp = admin_pb.ListPacksResponse(resident=[self._resident(r) for r in m.residents()],
                                              refused=m.refused())
            if request.include_store:
                store = self.srv.store
                for name in store.list_packs():
                    resp.store.add(name=name, versions=[v.version for v in store.list_versions(name)],
                                   aliases=store.aliases(name))
            return resp
        return self._call("ListPacks", request, context, fn)

    def LoadPack(self, request, context):
        def fn():
            parse_pack_ref(request.ref, "ref")
            r, routes = self.srv.packs.activate(request.ref, activate=request.activate)
            return admin_pb.LoadPackResponse(pack=self._resident(r), gate=self._gate(r), routes=routes)
        return self._call("LoadPack", request, context, fn)

    def SetAlias(self, request, context):
        def fn():
            from serve.params import invalid
            parse_pack_ref(request.name, "name")
            if not request.alias:
                raise invalid("alias", "empty alias")
            if not request.version:
                raise invalid("version", "empty version")
            r, routes = self.srv.packs.set_alias(request.name, request.alias, request.version)
            return admin_pb.LoadPackResponse(pack=self._resident(r), gate=self._gate(r), routes=routes)
        return self._call("SetAlias", request, context, fn)

    def UnloadPack(self, request, context):
        def fn():
            name, version, freed = self.srv.packs.unload(request.ref)
            return admin_pb.UnloadPackResponse(name=name, version=version, freed=freed)
        return self._call("UnloadPack", request, context, fn)

    def ABReport(self, request, context):
        def fn():
            s = self.srv
            resp = admin_pb.ABReportResponse(traffic_share=s.cfg.ab.traffic_share, sample_rate=s.cfg.ab.sample_rate,
                                             confidence=s.cfg.ab.confidence)
            stats = s.monitor.report() if s.monitor is not None else {}
            gates = {}
            for r in s.packs.residents():
                if r.gate is not None:
                    gates[(r.name, r.version)] = r.gate.ratio
            for name, version in sorted(set(stats) | set(gates)):
                if request.name and name != request.name:
                    continue
                st = stats.get((name, version))
                if st is None:
                    resp.packs.add(name=name, version=version, gate_ratio=gates[(name, version)])
                    continue
                p = resp.packs.add(name=name, version=version, samples=st.samples, ratio=st.ratio,
                                   ci_lower=st.lower, ci_upper=st.upper, epsilon=st.epsilon, breached=st.breached,
                                   disabled=st.disabled, tokens=st.tokens)
                if (name, version) in gates:
                    p.gate_ratio = gates[(name, version)]
            return resp
        return self._call("ABReport", request, context, fn)


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
DEMO_ADMIN_TOKEN = "demo-admin-token"     # serve/configs/demo.yaml's; valid on loopback binds only


def _enable_reflection(services: tuple[str, ...], server: grpc.Server) -> None:
    """Server reflection under both names clients use: v1 (grpcurl, Postman, current grpc tools) and
    v1alpha. grpcio-reflection ships only v1alpha; the v1 messages are the same on the wire, so one
    servicer answers both."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    names = tuple(services) + (reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SensepackServer:
    def __init__(self, config: Config, served: Served | None = None):
        self.cfg = config
        if config.admin.resolved_token() == DEMO_ADMIN_TOKEN and not _loopback(config.server.host):
            raise ValueError(f"admin.token: the demo token is for loopback binds only, and server.host is "
                             f"{config.server.host!r}; set ${config.admin.token_env} or admin.token")
        if config.model.torch_threads:
            import torch

            torch.set_num_threads(config.model.torch_threads)
        self.served = served or build_served(config.model)
        self.ensemble = self.served.ensemble
        self.tokenizer = self.served.tokenizer
        self.vocab = self.served.vocab
        self.context_len = served_context(config, int(self.ensemble.context_limit))
        self.metrics = Metrics()
        if config.engine == "vllm":
            from serve.vllm.engine import VLLMEngine

            self.engine = VLLMEngine({}, self.tokenizer, config.limits, self.metrics,
                                     backpack=self.ensemble.backpack, ensemble=self.ensemble,
                                     lane_every_steps=config.ab.lane_every_steps,
                                     v2_model_runner={"auto": None, "v1": False, "v2": True}[config.vllm.model_runner],
                                     in_process=not config.vllm.multiprocessing)
        else:
            self.engine = eng.Engine(self.ensemble, self.tokenizer, config.limits, self.metrics,
                                     lane_every_steps=config.ab.lane_every_steps)
        if config.store.uri is None and self.served.demo_pack is None:
            raise ValueError("store.uri is required unless the demo profile provides its pack")
        self.store, self.store_uri, self._temp_store = open_pack_store(config.store, self.served)
        if config.engine == "vllm":
            from serve.vllm.engine import engine_args_from_config

            self.engine.engine_args = engine_args_from_config(config, self.store_uri, vocab=self.vocab)
        self.gate = Gate(self.engine, self.ensemble, self.tokenizer, config.gate) if config.gate.enabled else None
        self.monitor = LiveMonitor(config.ab, self.metrics, self.engine, self.ensemble) if config.ab.enabled else None
        self.packs = PackManager(self.store, expectations(self.served), self.ensemble.large_fingerprint(), config,
                                 self.metrics, gate=self.gate, ab=self.monitor)
        if self.monitor is not None:
            self.monitor.manager = self.packs
        if config.engine == "vllm":
            from serve.vllm.resolver import PackManagerSource

            self.engine.pack_source = PackManagerSource(self.packs)   # pinned versions reach the processor
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._grpc: grpc.Server | None = None
        self._http = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stopped = threading.Event()
        self._done = threading.Event()

    # ---- info
    def model_info(self) -> pb.ModelInfoResponse:
        ens, lim = self.ensemble, self.cfg.limits
        large, bp = ens.large, ens.backpack
        p0 = next(large.parameters())
        resp = pb.ModelInfoResponse(tokenizer_fingerprint=self._tok_fp, shared_vocab_size=self.vocab.size,
                                    eos_token_id=self.vocab.eos_id,
                                    engine="vllm" if self.cfg.engine == "vllm" else "embedded-transformers",
                                    server_version=SERVER_VERSION)
        resp.models.add(role="large", name=self.served.large_name, fingerprint=ens.large_fingerprint(),
                        architecture=type(large).__name__,
                        vocab_size=large.get_output_embeddings().weight.shape[0], max_positions=self.context_len,
                        dtype=str(p0.dtype).replace("torch.", ""), device=str(p0.device))
        bq = next(bp.parameters())
        resp.models.add(role="backpack", name=self.served.backpack_name, fingerprint=bp.fingerprint(),
                        architecture=type(bp).__name__, vocab_size=bp.config.vocab_size,
                        max_positions=bp.config.n_positions, dtype=str(bq.dtype).replace("torch.", ""),
                        device=str(bq.device), num_senses=bp.config.num_senses, d_model=bp.config.n_embd)
        resp.limits.CopyFrom(pb.Limits(max_prompt_tokens=lim.max_prompt_tokens, max_new_tokens=lim.max_new_tokens,
                                       default_max_new_tokens=lim.default_max_new_tokens, max_running=lim.max_running,
                                       max_waiting=lim.max_waiting, max_top_n_tokens=lim.max_top_n_tokens,
                                       max_stop_sequences=lim.max_stop_sequences,
                                       max_packs_per_request=lim.max_packs_per_request,
                                       max_continuations=lim.max_continuations))
        for route, r in sorted(self.packs.routes().items()):
            if r is not None:
                resp.active_packs.add(route=route, name=r.name, version=r.version, beta=r.calibrated_beta,
                                      epsilon=r.epsilon)
        return resp

    # ---- lifecycle
    def start(self) -> "SensepackServer":
        from ensemble.tokenizer import tokenizer_fingerprint

        cfg = self.cfg
        self._tok_fp = tokenizer_fingerprint(self.tokenizer)
        self.engine.start()
        workers = max(cfg.server.max_workers, cfg.limits.max_running + cfg.limits.max_waiting + 16)
        auth = AdminAuthInterceptor(cfg.admin.resolved_token(), ADMIN_SERVICE,
                                    on_denied=lambda m, c: self.metrics.requests.labels(
                                        method_label(m.rsplit("/", 1)[-1]), c.name).inc())
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sensepack-rpc"),
                                 interceptors=[auth, DecodeGuard((GENERATION_SERVICE, ADMIN_SERVICE))],
                                 options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(self), self._grpc)
        admin_pb_grpc.add_PackAdminServicer_to_server(AdminServicer(self), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        services = ("", GENERATION_SERVICE, ADMIN_SERVICE)
        for name in services:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if cfg.server.reflection:
            _enable_reflection((GENERATION_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME), self._grpc)
        addr = f"{cfg.server.host}:{cfg.server.port}"
        if cfg.tls.enabled:
            key = open(cfg.tls.key_file, "rb").read()
            cert = open(cfg.tls.cert_file, "rb").read()
            ca = open(cfg.tls.client_ca_file, "rb").read() if cfg.tls.client_ca_file else None
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
            self.port = self._grpc.add_secure_port(addr, creds)
        else:
            self.port = self._grpc.add_insecure_port(addr)
        if not self.port:
            raise RuntimeError(f"server.port: could not bind {addr}")
        if cfg.server.metrics_port >= 0:
            self._http, _, self.metrics_port = self.metrics.serve_http(cfg.server.metrics_host, cfg.server.metrics_port)
        self._grpc.start()
        for ref in cfg.packs.preload:
            try:
                self.packs.activate(ref, activate=True)
            except RequestError as e:
                log.error("preload refused", extra={"event": "preload_refused", "pack": ref, "reason": e.message})
        if self.served.demo_pack is not None and not cfg.packs.preload:
            try:
                self.packs.activate(f"{self.served.demo_pack.name}@prod", activate=True)
            except RequestError as e:
                log.error("demo pack refused", extra={"event": "preload_refused", "reason": e.message})
        if cfg.store.subscribe:
            self.packs.subscribe(cfg.store.poll_interval_s)
        if cfg.server.warmup:
            self._warmup()
        for name in services:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"event": "serving", "address": f"{cfg.server.host}:{self.port}",
                                   "metrics_port": self.metrics_port, "tls": cfg.tls.enabled,
                                   "store": self.store_uri, "routes": sorted(self.packs.routes())})
        return self

    def _warmup(self) -> None:
        from serve.params import GenerationRequest

        req = GenerationRequest(request_id="warmup", prompt_ids=[self.vocab.eos_id], packs=[], max_new_tokens=2,
                                ignore_eos=True)
        seq = self.engine.submit(req, [])
        while not isinstance(seq.events.get(timeout=120), eng.FinishEvent):
            pass

    def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new requests, drain running ones (up to `grace` s), stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            grace = self.cfg.server.grace_period_s if grace is None else grace
            self.health.enter_graceful_shutdown()
            self.engine.stop_accepting()
            drained = self.engine.drain(grace)
            log.info("shutting down", extra={"event": "shutdown", "drained": drained})
            if not drained:     # cut what is left with its own status (UNAVAILABLE, "retry"), then stop
                self.engine.cut(eng.SHUTDOWN)
                self.engine.drain(5.0)
            if self._grpc is not None:
                self._grpc.stop(grace=1.0).wait()
            self.engine.stop(0)
            self.packs.close()
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            if self._temp_store:
                import shutil

                shutil.rmtree(self.store_uri, ignore_errors=True)
            log.info("stopped", extra={"event": "stopped"})
        finally:
            self._done.set()

    def wait(self) -> None:
        """Block until stop() has finished (drained, gRPC stopped, engine stopped)."""
        self._done.wait()
