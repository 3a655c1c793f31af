"""The server: its components built in one place (`build_components`: store, engine, gate, live
monitor, pack manager, the front-end-neutral GenerationService), the gRPC front-end (the servicers of
serve.rpc, health, reflection, TLS), the OpenAI-compatible HTTP front-end when `http.enabled`
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
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ensemble.tokenizer import tokenizer_fingerprint
from sensepack_proto import ADMIN_SERVICE, GENERATION_SERVICE, admin_pb_grpc, pb, pb_grpc
from serve import engine as eng
from serve import scheduler as sched
from serve.abtest import Gate, LiveMonitor
from serve.config import Config, served_context
from serve.errors import ServeError
from serve.metrics import GRPC, Metrics, method_label
from serve.models import Served, build_served, expectations, open_pack_store
from serve.pack_cache import ResidentTable
from serve.packs import PackManager
from serve.params import GenerationRequest
from serve.rpc.auth import AdminAuthInterceptor, ApiKeyInterceptor
from serve.sampling_params import SamplingParams
from serve.scoring import EmbeddedScorer, Scorer
from serve.service import EngineAPI, GenerationService
from serve.tenants import Tenants

if TYPE_CHECKING:
    from serve.http.frontend import HttpFrontend

from serve.rpc.admin import AdminServicer
from serve.rpc.common import DecodeGuard
from serve.rpc.generation import GenerationServicer

log = logging.getLogger("sensepack.server")

SERVER_VERSION = "0.1.0"
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
