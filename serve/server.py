"""The server: its components built in one place (`build_components`: store, engine, gate, live
monitor, pack manager, the front-end-neutral GenerationService), the gRPC front-end (generation and
admin servicers, health, reflection, TLS), the OpenAI-compatible HTTP front-end when `http.enabled`
(serve.http), /metrics, graceful shutdown.

    server = SensepackServer(config).start()    # binds, warms up, SERVING
    ...
    server.stop()                               # drains running requests

Tests and benchmarks pass a pre-built `Served` (models) to share one model
across servers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edits_store.errors import PackError
from ensemble.tokenizer import tokenizer_fingerprint
from sensepack_proto import ADMIN_SERVICE, GENERATION_SERVICE, admin_pb, admin_pb_grpc, pb, pb_grpc
from serve import engine as eng
from serve import scheduler as sched
from serve.abtest import Gate, LiveMonitor
from serve.auth import AdminAuthInterceptor, ApiKeyInterceptor, caller_header
from serve.config import Config, served_context
from serve.errors import InvalidRequest, ServeError, from_pack_error, status_of
from serve.metrics import GRPC, Metrics, method_label
from serve.models import Served, build_served, expectations, open_pack_store
from serve.pack_cache import ResidentTable
from serve.packs import PackManager
from serve.params import GenerationRequest, parse_generate, parse_pack_ref, parse_score
from serve.sampling_params import SamplingParams
from serve.scoring import EmbeddedScorer, Scorer
from serve.service import EngineAPI, GenerationService, PackUsage, ended_reason, finish_error, reason_error
from serve.tenants import TENANT_NAME, Tenant, Tenants

if TYPE_CHECKING:
    from serve.http.frontend import HttpFrontend

log = logging.getLogger("sensepack.server")

SERVER_VERSION = "0.1.0"
_STOP = {
    sched.MAX_TOKENS: pb.MAX_TOKENS,
    sched.EOS_TOKEN: pb.EOS_TOKEN,
    sched.STOP_SEQUENCE: pb.STOP_SEQUENCE,
    sched.CANCELLED: pb.CANCELLED,
    sched.TIME_LIMIT: pb.TIME_LIMIT,
    sched.ERROR: pb.ERROR,
    sched.REFUSED: pb.ERROR,
    sched.SHUTDOWN: pb.CANCELLED,
    sched.STOP_TOKEN: pb.STOP_TOKEN,
    sched.UNAVAILABLE: pb.ERROR,
}


def grpc_code(err: BaseException) -> grpc.StatusCode:
    """The gRPC status of a domain error (serve.errors.STATUS, the one mapping)."""
    return getattr(grpc.StatusCode, status_of(err).grpc)


def _time_left(context) -> float | None:
    left = context.time_remaining()
    return None if left is None or left > 1e7 else max(left, 0.0)


def _deadline(context) -> float | None:
    left = _time_left(context)
    return None if left is None else time.monotonic() + left


class _Tracked:
    """Records sensepack_requests_total{method,status,frontend="grpc"} exactly once per RPC."""

    def __init__(self, metrics: Metrics, method: str):
        self.metrics, self.method, self.done = metrics, method, False

    def record(self, code: grpc.StatusCode) -> None:
        if not self.done:
            self.done = True
            self.metrics.requests.labels(self.method, code.name, GRPC).inc()


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
        if (
            handler is None
            or not handler_call_details.method.startswith(self._prefixes)
            or handler.request_deserializer is None
            or not hasattr(handler, "_replace")
        ):
            return handler
        decode = handler.request_deserializer

        def guarded(data: bytes):
            try:
                return decode(data)
            except Exception as e:  # noqa: BLE001 - any decode failure is the client's
                return Undecodable(f"{type(e).__name__}: {e}")

        return handler._replace(request_deserializer=guarded)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """gRPC wire format over serve.service: proto in, validated request through the service, proto out;
    domain errors become status codes through serve.errors."""

    def __init__(self, srv: SensepackServer):
        self.srv = srv
        self.service: GenerationService = srv.service

    # ---- helpers
    @staticmethod
    def _pack_used(packs: list[PackUsage]) -> list:
        return [pb.PackUsed(ref=p.ref, name=p.name, version=p.version, beta=p.beta, arm=p.arm) for p in packs]

    def _token_info(self, ev: eng.TokenEvent) -> pb.TokenInfo:
        text = self.service.token_text
        info = pb.TokenInfo(id=ev.token_id, text=text(ev.token_id))
        if ev.logprob is not None:
            info.logprob = ev.logprob
        for i, lp in ev.top:
            info.top_tokens.add(id=i, text=text(i), logprob=lp)
        return info

    @staticmethod
    def _fail(context, tracked, err: ServeError):
        code = grpc_code(err)
        tracked.record(code)
        context.abort(code, err.message)

    @staticmethod
    def _internal(context, tracked, err: Exception):
        log.exception("request failed", extra={"event": "internal_error", "method": tracked.method})
        tracked.record(grpc.StatusCode.INTERNAL)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")

    def _tenant(self, context) -> Tenant | None:
        """The caller's tenant (None: an open key); the interceptor has already refused a bad key."""
        return self.srv.tenants.identify(caller_header(context.invocation_metadata()))

    # ---- RPCs
    def _start(self, request, context, tracked):
        """Admit the request; the response head every Generate / GenerateStream reply starts with."""
        s = self.srv
        try:
            req = parse_generate(request, s.tokenizer, s.cfg.limits, s.context_len, s.vocab)
            gen = self.service.generate(req, _deadline(context), tenant=self._tenant(context))
        except ServeError as e:
            self._fail(context, tracked, e)
        except Exception as e:  # noqa: BLE001 - reported as INTERNAL, counted, logged
            self._internal(context, tracked, e)
        context.add_callback(gen.cancel)
        head = pb.GenerateResponse(request_id=req.request_id, input_token_count=len(req.prompt_ids))
        if req.sampling.want_input_tokens:
            head.input_token_ids.extend(req.prompt_ids)
        if req.sampling.want_prompt_logprobs and len(req.prompt_ids) > 1:
            try:
                head.prompt_logprobs.extend(gen.prompt_logprobs(_time_left(context)).logprobs)
            except ServeError as e:
                self._fail(context, tracked, e)
        head.packs.extend(self._pack_used(gen.packs))
        if gen.seed is not None:
            head.seed = gen.seed
        return req, gen, head

    def _abort_if_failed(self, context, tracked, ev: eng.FinishEvent) -> None:
        err = finish_error(ev)
        if err is not None:
            self._fail(context, tracked, err)

    def Generate(self, request, context):
        tracked = _Tracked(self.srv.metrics, "Generate")
        _check_decoded(request, context, tracked)
        req, gen, resp = self._start(request, context, tracked)
        for ev in gen.events(context.is_active):
            if isinstance(ev, eng.TokenEvent):
                if req.sampling.want_tokens:
                    resp.tokens.append(self._token_info(ev))
                continue
            self._abort_if_failed(context, tracked, ev)
            if ev.last is not None and req.sampling.want_tokens:
                resp.tokens.append(self._token_info(ev.last))
            resp.text = ev.text
            resp.generated_token_count = len(ev.output_ids)
            resp.stop_reason = _STOP[ev.reason]
            resp.stop_sequence = ev.stop_sequence
        tracked.record(grpc.StatusCode.OK)
        return resp

    def GenerateStream(self, request, context):
        tracked = _Tracked(self.srv.metrics, "GenerateStream")
        _check_decoded(request, context, tracked)
        req, gen, first = self._start(request, context, tracked)
        yield first
        try:
            for ev in gen.events(context.is_active):
                if isinstance(ev, eng.TokenEvent):
                    msg = pb.GenerateResponse(
                        request_id=req.request_id, text=ev.text_delta, generated_token_count=ev.generated
                    )
                    if req.sampling.want_tokens:
                        msg.tokens.append(self._token_info(ev))
                    yield msg
                    continue
                self._abort_if_failed(context, tracked, ev)
                tracked.record(grpc.StatusCode.OK)
                msg = pb.GenerateResponse(
                    request_id=req.request_id,
                    text=ev.text_delta,
                    generated_token_count=len(ev.output_ids),
                    stop_reason=_STOP[ev.reason],
                    stop_sequence=ev.stop_sequence,
                )
                if ev.last is not None and req.sampling.want_tokens:
                    msg.tokens.append(self._token_info(ev.last))
                yield msg
        finally:
            if not tracked.done:  # the consumer went away (cancel / deadline): free the slot now
                reason = ended_reason(gen.seq)
                gen.cancel(reason)
                tracked.record(grpc_code(reason_error(reason)("", "")))

    def Score(self, request, context):
        s = self.srv
        tracked = _Tracked(s.metrics, "Score")
        _check_decoded(request, context, tracked)
        abandoned = threading.Event()
        try:
            req = parse_score(request, s.tokenizer, s.cfg.limits, s.context_len, s.vocab)
            context.add_callback(abandoned.set)
            result = self.service.score(
                req, _deadline(context), context.is_active, abandoned, tenant=self._tenant(context)
            )
        except ServeError as e:
            self._fail(context, tracked, e)
        except Exception as e:  # noqa: BLE001 - reported as INTERNAL, counted, logged
            self._internal(context, tracked, e)
        resp = pb.ScoreResponse(request_id=req.request_id, prefix_token_count=len(req.prefix_ids))
        resp.packs.extend(self._pack_used(result.packs))
        for i, ids in enumerate(req.continuations):
            c = resp.continuations.add(token_ids=ids, tokens=[self.service.token_text(t) for t in ids])
            if req.include_base:
                v = result.base[i].double()
                c.base.token_logprobs.extend(v.tolist())
                c.base.total_logprob = float(v.sum())
            if req.packs:
                v = result.packed[i].double()
                c.packed.token_logprobs.extend(v.tolist())
                c.packed.total_logprob = float(v.sum())
        s.metrics.prompt_tokens.inc(len(req.prefix_ids) + sum(map(len, req.continuations)))
        tracked.record(grpc.StatusCode.OK)
        return resp

    def Tokenize(self, request, context):
        tracked = _Tracked(self.srv.metrics, "Tokenize")
        _check_decoded(request, context, tracked)
        try:
            ids = self.service.tokenize(request.text)
        except ServeError as e:
            self._fail(context, tracked, e)
        resp = pb.TokenizeResponse(token_ids=ids, token_count=len(ids))
        if request.return_tokens:
            resp.tokens.extend(self.srv.tokenizer.convert_ids_to_tokens(ids))
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
    def __init__(self, srv: SensepackServer):
        self.srv = srv

    def _resident(self, r) -> admin_pb.ResidentPack:
        m = self.srv.packs
        out = admin_pb.ResidentPack(
            name=r.name,
            version=r.version,
            calibrated_beta=r.calibrated_beta,
            epsilon=r.epsilon,
            state=m.state_of(r),
            routes=m.routes_of(r),
            running_requests=r.refcount,
        )
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
        except ServeError as e:
            code = grpc_code(e)
            tracked.record(code)
            context.abort(code, e.message)
        except Exception as e:
            if isinstance(e, PackError):
                err = from_pack_error(e)
                tracked.record(grpc_code(err))
                context.abort(grpc_code(err), err.message)
            raise
        tracked.record(grpc.StatusCode.OK)
        return out

    def ListPacks(self, request, context):
        def fn():
            m = self.srv.packs
            resp = admin_pb.ListPacksResponse(resident=[self._resident(r) for r in m.residents()], refused=m.refused())
            if request.include_store:
                store = self.srv.store
                for name in store.list_packs():
                    resp.store.add(
                        name=name, versions=[v.version for v in store.list_versions(name)], aliases=store.aliases(name)
                    )
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
            parse_pack_ref(request.name, "name")
            if not request.alias:
                raise InvalidRequest("alias", "empty alias")
            if not request.version:
                raise InvalidRequest("version", "empty version")
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
            resp = admin_pb.ABReportResponse(
                traffic_share=s.cfg.ab.traffic_share, sample_rate=s.cfg.ab.sample_rate, confidence=s.cfg.ab.confidence
            )
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
                p = resp.packs.add(
                    name=name,
                    version=version,
                    samples=st.samples,
                    ratio=st.ratio,
                    ci_lower=st.lower,
                    ci_upper=st.upper,
                    epsilon=st.epsilon,
                    breached=st.breached,
                    disabled=st.disabled,
                    tokens=st.tokens,
                )
                if (name, version) in gates:
                    p.gate_ratio = gates[(name, version)]
            return resp

        return self._call("ABReport", request, context, fn)

    def _tenant_info(self, t: Tenant) -> admin_pb.TenantInfo:
        tenants = self.srv.tenants
        out = admin_pb.TenantInfo(
            name=t.name,
            packs=list(t.prefixes),
            max_cold_loads=t.max_cold_loads,
            keys=tenants.keys_of(t.name),
            running=t.running,
            loading=t.loading,
            source=tenants.source.get(t.name, ""),
        )
        if t.max_concurrent_requests is not None:
            out.max_concurrent_requests = t.max_concurrent_requests
        return out

    def ListTenants(self, request, context):
        def fn():
            tenants = self.srv.tenants.tenants
            return admin_pb.ListTenantsResponse(tenants=[self._tenant_info(t) for _, t in sorted(tenants.items())])

        return self._call("ListTenants", request, context, fn)

    def SetTenant(self, request, context):
        def fn():
            if not TENANT_NAME.match(request.name):
                raise InvalidRequest("name", f"{request.name!r}: letters, digits, '.', '_', '-', at most 64")
            limit = request.max_concurrent_requests if request.HasField("max_concurrent_requests") else None
            loads = request.max_cold_loads if request.HasField("max_cold_loads") else 1
            if limit is not None and limit < 1:
                raise InvalidRequest("max_concurrent_requests", f"{limit}: must be >= 1 (unset: no bound)")
            if loads < 1:
                raise InvalidRequest("max_cold_loads", f"{loads}: must be >= 1")
            try:
                t = self.srv.tenants.set(Tenant(request.name, tuple(request.packs), limit, loads), list(request.keys))
            except ValueError as e:
                field, _, msg = str(e).partition(": ")
                raise InvalidRequest(field, msg) from None
            self.srv.metrics.touch_tenants([t.name])
            log.warning("tenant set", extra={"event": "tenant_set", "tenant": t.name, "packs": list(t.prefixes)})
            return self._tenant_info(t)

        return self._call("SetTenant", request, context, fn)

    def RemoveTenant(self, request, context):
        def fn():
            removed = self.srv.tenants.remove(request.name)
            if removed:
                log.warning("tenant removed", extra={"event": "tenant_removed", "tenant": request.name})
            return admin_pb.RemoveTenantResponse(removed=removed)

        return self._call("RemoveTenant", request, context, fn)


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
DEMO_ADMIN_TOKEN = "demo-admin-token"  # serve/configs/demo.yaml's; valid on loopback binds only


def _enable_reflection(services: tuple[str, ...], server: grpc.Server) -> None:
    """Server reflection under both names clients use: v1 (grpcurl, Postman, current grpc tools) and
    v1alpha. grpcio-reflection ships only v1alpha; the v1 messages are the same on the wire, so one
    servicer answers both."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    names = tuple(services) + (reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REFLECTION_V1,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerEngine(EngineAPI, Protocol):
    """The engine as the server runs it (serve.engine.Engine and its vLLM subclass): the front-ends'
    EngineAPI, its lifecycle, and the hook told when the model runner dies."""

    on_dead: Callable[[str], None] | None

    def start(self) -> None: ...
    def stop_accepting(self) -> None: ...
    def drain(self, timeout: float | None) -> bool: ...
    def cut(self, reason: str = sched.SHUTDOWN) -> None: ...
    def stop(self, drain_timeout: float | None = 0.0) -> None: ...


def build_engine(
    config: Config, served: Served, metrics: Metrics, store_uri: str | None, residents: ResidentTable
) -> tuple[ServerEngine, Scorer, str]:
    """The engine `config.engine` names, its scorer (Score, prompt log-probs, gate, A/B) and its name for
    ModelInfo. The vLLM engine reads pinned versions' edits from the pack manager's resident table
    (built before the manager) and scores through vLLM itself (no second copy of the large model)."""
    if config.engine == "vllm":
        from serve.vllm.engine import VLLMEngine, engine_args_from_config
        from serve.vllm.resolver import PackManagerSource
        from serve.vllm.scoring import VLLMScorer

        engine = VLLMEngine(
            engine_args_from_config(config, store_uri, vocab=served.vocab),
            served.tokenizer,
            config.limits,
            metrics,
            backpack=served.backpack,
            pack_source=PackManagerSource(residents),
            vocab=served.vocab,
            lane_every_steps=config.ab.lane_every_steps,
            v2_model_runner={"auto": None, "v1": False, "v2": True}[config.vllm.model_runner],
            in_process=not config.vllm.multiprocessing,
        )
        return engine, VLLMScorer(engine), "vllm"
    if served.ensemble is None:
        raise ValueError("engine: embedded needs the large model loaded (build_served without large_from_checkpoint)")
    served.ensemble.combined.budget_bytes = config.packs.max_combined_bytes
    embedded = eng.Engine(
        served.ensemble, served.tokenizer, config.limits, metrics, lane_every_steps=config.ab.lane_every_steps
    )
    return embedded, EmbeddedScorer(embedded, served.ensemble), "embedded-transformers"


@dataclass
class Components:
    """Everything one server runs, built once, in dependency order (store, engine, gate and monitor,
    pack manager, service); the front-ends get `service`."""

    served: Served
    metrics: Metrics
    store: object
    store_uri: str
    temp_store: bool
    engine: ServerEngine
    scorer: Scorer
    engine_name: str
    gate: Gate | None
    monitor: LiveMonitor | None
    packs: PackManager
    service: GenerationService


def build_components(config: Config, served: Served) -> Components:
    if config.store.uri is None and served.demo_pack is None:
        raise ValueError("store.uri is required unless the demo profile provides its pack")
    metrics = Metrics()
    store, store_uri, temp_store = open_pack_store(config.store, served)
    residents = ResidentTable()
    engine, scorer, engine_name = build_engine(config, served, metrics, store_uri, residents)
    tok = served.tokenizer
    gate = Gate(scorer, tok, config.gate) if config.gate.enabled else None
    monitor = LiveMonitor(config.ab, metrics, scorer) if config.ab.enabled else None
    packs = PackManager(
        store,
        expectations(served),
        served.large.fingerprint,
        config,
        metrics,
        gate=gate,
        ab=monitor,
        residents=residents,
    )
    service = GenerationService(engine, packs, monitor, scorer, tok)
    return Components(
        served, metrics, store, store_uri, temp_store, engine, scorer, engine_name, gate, monitor, packs, service
    )


class SensepackServer:
    """The gRPC front-end (and, with `http.enabled`, the OpenAI-compatible HTTP one) over one set of
    `Components`."""

    def __init__(self, config: Config, served: Served | None = None):
        self.cfg = config
        if config.admin.resolved_token() == DEMO_ADMIN_TOKEN and not _loopback(config.server.host):
            raise ValueError(
                f"admin.token: the demo token is for loopback binds only, and server.host is "
                f"{config.server.host!r}; set ${config.admin.token_env} or admin.token"
            )
        if config.model.torch_threads:
            import torch

            torch.set_num_threads(config.model.torch_threads)
        if served is None:  # with engine: vllm the large model lives in vLLM only (one copy)
            vllm_model = (config.vllm.model or config.model.large_model) if config.engine == "vllm" else None
            served = build_served(config.model, large_from_checkpoint=vllm_model)
        c = self.components = build_components(config, served)
        self.served, self.metrics, self.engine, self.packs = c.served, c.metrics, c.engine, c.packs
        self.gate, self.monitor, self.service = c.gate, c.monitor, c.service
        self.store, self.store_uri, self._temp_store = c.store, c.store_uri, c.temp_store
        self.ensemble, self.tokenizer, self.vocab = served.ensemble, served.tokenizer, served.vocab
        self.context_len = served_context(config, int(served.large.context_limit))
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.tenants = Tenants(config.api)  # who a generation key is: open, or a tenant scoped to pack prefixes
        self.metrics.touch_tenants(list(self.tenants.tenants))
        self._grpc: grpc.Server | None = None
        self._http = None
        self._api: HttpFrontend | None = None  # when http.enabled
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._stopped = threading.Event()
        self._done = threading.Event()
        self.exit_code = 0  # non-zero: the process should exit so its orchestrator restarts it
        self.engine.on_dead = self._engine_died

    # ---- info
    def model_info(self) -> pb.ModelInfoResponse:
        lim = self.cfg.limits
        large, bp = self.served.large, self.served.backpack
        resp = pb.ModelInfoResponse(
            tokenizer_fingerprint=self._tok_fp,
            shared_vocab_size=self.vocab.size,
            eos_token_id=self.vocab.eos_id,
            engine=self.components.engine_name,
            server_version=SERVER_VERSION,
        )
        resp.models.add(
            role="large",
            name=self.served.large_name,
            fingerprint=large.fingerprint,
            architecture=large.architecture,
            vocab_size=large.vocab_rows,
            max_positions=self.context_len,
            dtype=large.dtype,
            device=large.device,
        )
        bq = next(bp.parameters())
        resp.models.add(
            role="backpack",
            name=self.served.backpack_name,
            fingerprint=bp.fingerprint(),
            architecture=type(bp).__name__,
            vocab_size=bp.config.vocab_size,
            max_positions=bp.config.n_positions,
            dtype=str(bq.dtype).replace("torch.", ""),
            device=str(bq.device),
            num_senses=bp.config.num_senses,
            d_model=bp.config.n_embd,
        )
        resp.limits.CopyFrom(
            pb.Limits(
                max_prompt_tokens=lim.max_prompt_tokens,
                max_new_tokens=lim.max_new_tokens,
                default_max_new_tokens=lim.default_max_new_tokens,
                max_running=lim.max_running,
                max_waiting=lim.max_waiting,
                max_top_n_tokens=lim.max_top_n_tokens,
                max_stop_sequences=lim.max_stop_sequences,
                max_packs_per_request=lim.max_packs_per_request,
                max_continuations=lim.max_continuations,
            )
        )
        for route, r in sorted(self.packs.routes().items()):
            if r is not None:
                resp.active_packs.add(
                    route=route, name=r.name, version=r.version, beta=r.calibrated_beta, epsilon=r.epsilon
                )
        return resp

    # ---- lifecycle
    def start(self) -> SensepackServer:
        cfg = self.cfg
        self._tok_fp = tokenizer_fingerprint(self.tokenizer)
        self.engine.start()
        workers = max(cfg.server.max_workers, cfg.limits.max_running + cfg.limits.max_waiting + 16)
        auth = AdminAuthInterceptor(
            cfg.admin.resolved_token(),
            ADMIN_SERVICE,
            on_denied=lambda m, c: self.metrics.requests.labels(method_label(m.rsplit("/", 1)[-1]), c.name, GRPC).inc(),
        )
        keys = ApiKeyInterceptor(
            self.tenants,
            GENERATION_SERVICE,
            on_denied=lambda m, c: self.metrics.requests.labels(method_label(m.rsplit("/", 1)[-1]), c.name, GRPC).inc(),
        )
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sensepack-rpc"),
            interceptors=[auth, keys, DecodeGuard((GENERATION_SERVICE, ADMIN_SERVICE))],
            options=[("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(self), self._grpc)
        admin_pb_grpc.add_PackAdminServicer_to_server(AdminServicer(self), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        services = ("", GENERATION_SERVICE, ADMIN_SERVICE)
        for name in services:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if cfg.server.reflection:
            _enable_reflection((GENERATION_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME), self._grpc)
        addr = f"{cfg.server.host}:{cfg.server.port}"
        tls = cfg.tls
        if tls.cert_file is not None and tls.key_file is not None:  # tls.enabled (the config sets both or neither)
            key = Path(tls.key_file).read_bytes()
            cert = Path(tls.cert_file).read_bytes()
            ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
            self.port = self._grpc.add_secure_port(addr, creds)
        else:
            self.port = self._grpc.add_insecure_port(addr)
        if not self.port:
            raise RuntimeError(f"server.port: could not bind {addr}")
        if cfg.server.metrics_port >= 0:
            self._http, _, self.metrics_port = self.metrics.serve_http(cfg.server.metrics_host, cfg.server.metrics_port)
        if cfg.http.enabled:
            from serve.http.frontend import HttpFrontend  # FastAPI/uvicorn are imported only when the HTTP port is on

            self._api = HttpFrontend(
                self.service,
                self.packs,
                cfg,
                self.tokenizer,
                self.vocab,
                self.context_len,
                self.metrics,
                cfg.http.served_model_name or self.served.large_name,
                self.tenants,
            ).start()
            self.http_port = self._api.port
        self._grpc.start()
        for ref in cfg.packs.preload:
            try:
                self.packs.activate(ref, activate=True)
            except ServeError as e:
                log.error("preload refused", extra={"event": "preload_refused", "pack": ref, "reason": e.message})
        if self.served.demo_pack is not None and not cfg.packs.preload:
            try:
                self.packs.activate(f"{self.served.demo_pack.name}@prod", activate=True)
            except ServeError as e:
                log.error("demo pack refused", extra={"event": "preload_refused", "reason": e.message})
        if cfg.store.subscribe:
            self.packs.subscribe(cfg.store.poll_interval_s)
        if cfg.server.warmup:
            self._warmup()
        for name in services:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._api is not None:
            self._api.ready = True
        log.info(
            "serving",
            extra={
                "event": "serving",
                "address": f"{cfg.server.host}:{self.port}",
                "http_port": self.http_port,
                "metrics_port": self.metrics_port,
                "tls": cfg.tls.enabled,
                "store": self.store_uri,
                "routes": sorted(self.packs.routes()),
            },
        )
        return self

    def _warmup(self) -> None:
        req = GenerationRequest(
            request_id="warmup",
            prompt_ids=[self.vocab.eos_id],
            packs=[],
            sampling=SamplingParams(max_new_tokens=2, ignore_eos=True),
        )
        seq = self.engine.submit(req, [])
        while not isinstance(seq.events.get(timeout=120), eng.FinishEvent):
            pass

    def _engine_died(self, why: str) -> None:
        """The model runner is gone (vLLM's engine core process exited): its requests already ended
        UNAVAILABLE; go NOT_SERVING at once, then stop, and the CLI exits non-zero for a restart."""
        for name in ("", GENERATION_SERVICE, ADMIN_SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.error("engine died; stopping for a restart", extra={"event": "engine_dead", "reason": why})
        self.exit_code = 3
        threading.Thread(target=self.stop, kwargs={"grace": 0}, name="sensepack-engine-dead", daemon=True).start()

    def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new requests, drain running ones (up to `grace` s), stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            grace = self.cfg.server.grace_period_s if grace is None else grace
            self.health.enter_graceful_shutdown()
            if self._api is not None:
                self._api.ready = False
            self.engine.stop_accepting()
            drained = self.engine.drain(grace)
            log.info("shutting down", extra={"event": "shutdown", "drained": drained})
            if not drained:  # cut what is left with its own status (UNAVAILABLE, "retry"), then stop
                self.engine.cut(sched.SHUTDOWN)
                self.engine.drain(5.0)
            if self._grpc is not None:
                self._grpc.stop(grace=1.0).wait()
            if self._api is not None:
                self._api.stop()
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
