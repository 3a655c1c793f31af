"""Prometheus metrics (DESIGN §4). Names are a contract with deploy/: keep them.

Each server owns a `CollectorRegistry` (several servers can live in one
process, e.g. in tests); `/metrics` serves that registry.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# the `method` label's closed set: anything else a client sends (e.g. a made-up admin method) is "unknown"
GRPC_METHODS = ("Generate", "GenerateStream", "Score", "Tokenize", "ModelInfo")
HTTP_METHODS = ("completions", "chat.completions", "models")  # /v1/<method>
METHODS = frozenset(
    GRPC_METHODS
    + HTTP_METHODS
    + (
        "ListPacks",
        "LoadPack",
        "SetAlias",
        "UnloadPack",
        "ABReport",
        "ListTenants",
        "SetTenant",
        "RemoveTenant",
    )
)
UNKNOWN_METHOD = "unknown"
# the `frontend` label's closed set; `status` is the gRPC status name on both (serve.errors.STATUS)
GRPC, HTTP = "grpc", "http"


class FrontendLatency:
    """One front-end's children of the four latency histograms, resolved once."""

    def __init__(self, m: Metrics, frontend: str):
        self.ttft = m.ttft.labels(frontend)
        self.itl = m.itl.labels(frontend)
        self.e2e = m.e2e.labels(frontend)
        self.queue_time = m.queue_time.labels(frontend)


def method_label(name: str) -> str:
    """A request's method as a metrics label: one of METHODS or "unknown" (bounded series)."""
    return name if name in METHODS else UNKNOWN_METHOD


_STEP = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "sensepack_requests",
            "Finished requests by method, status (gRPC status name, for HTTP too) and front-end (grpc, http)",
            ["method", "status", "frontend"],
            registry=r,
        )
        self.ttft = Histogram(
            "sensepack_time_to_first_token_seconds",
            "Admission to first generated token",
            ["frontend"],
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "sensepack_inter_token_latency_seconds",
            "Time between generated tokens",
            ["frontend"],
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "sensepack_e2e_request_latency_seconds", "Arrival to last token", ["frontend"], buckets=_E2E, registry=r
        )
        self.queue_time = Histogram(
            "sensepack_queue_time_seconds",
            "Arrival to joining the running batch",
            ["frontend"],
            buckets=_LATENCY,
            registry=r,
        )
        # both series exist from the start; the engine observes through these children (no labels() per token)
        self.latency = {f: FrontendLatency(self, f) for f in (GRPC, HTTP)}
        self.running = Gauge("sensepack_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("sensepack_requests_waiting", "Requests waiting to join the batch", registry=r)
        self.prompt_tokens = Counter("sensepack_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("sensepack_generation_tokens", "Tokens generated", registry=r)
        self.backpack_step = Histogram(
            "sensepack_backpack_step_seconds",
            "Backpack time (delta computation) per decode step in which the Backpack ran",
            buckets=_STEP,
            registry=r,
        )
        self.exact_skip_steps = Counter(
            "sensepack_exact_skip_steps", "Row-steps served without running the Backpack (exact skip)", registry=r
        )
        self.window_reprefills = Counter(
            "sensepack_backpack_window_reprefills", "Backpack sliding-window re-prefills past its context", registry=r
        )
        self.backpack_resumes = Counter(
            "sensepack_backpack_resumes",
            "vLLM re-adds of a request that resumed its parked Backpack state (no Backpack prefill)",
            registry=r,
        )
        self.pack_loads = Counter("sensepack_pack_loads", "Pack version loads by result", ["result"], registry=r)
        self.active_pack = Gauge(
            "sensepack_active_pack_info", "Routed pack versions (value 1)", ["pack", "version", "alias"], registry=r
        )
        self.requests_by_pack = Counter(
            "sensepack_requests_by_pack", "Requests naming a pack, by arm", ["pack", "arm"], registry=r
        )
        # per (pack, version): a series exists only while the version's live record does (resident, or
        # kept after a breach for ABReport); `drop_version` removes it when the version leaves memory
        self.ab_ratio = Gauge(
            "sensepack_ab_ball_ratio", "Live A/B loss ratio B/A (pack / base)", ["pack", "version"], registry=r
        )
        self.ab_ci_upper = Gauge(
            "sensepack_ab_ball_ratio_ci_upper",
            "Upper confidence bound of the live ratio",
            ["pack", "version"],
            registry=r,
        )
        self.ab_ci_lower = Gauge(
            "sensepack_ab_ball_ratio_ci_lower",
            "Lower confidence bound of the live ratio",
            ["pack", "version"],
            registry=r,
        )
        self.ab_samples = Counter("sensepack_ab_samples", "Requests re-scored under both arms", ["pack"], registry=r)
        self.ab_breaches = Counter("sensepack_ab_breaches", "Confirmed live ball breaches", ["pack"], registry=r)
        self.auto_disables = Counter(
            "sensepack_pack_auto_disables", "Packs disabled after a breach", ["pack"], registry=r
        )
        self.http_cuts = Counter(
            "sensepack_http_connections_cut",
            "HTTP connections the server closed or refused because of the client: header_timeout, "
            "body_timeout, over_limit (http.max_connections), disconnect (the client left mid-body)",
            ["reason"],
            registry=r,
        )
        # tenant label: the configured tenants' names and "" (open keys), bounded by the config (serve.tenants)
        self.tenant_requests = Counter(
            "sensepack_tenant_requests", "Requests admitted, by tenant", ["tenant", "frontend"], registry=r
        )
        self.tenant_running = Gauge(
            "sensepack_tenant_requests_running", "Requests in flight, by tenant", ["tenant"], registry=r
        )
        self.tenant_limited = Counter(
            "sensepack_tenant_limited",
            "Requests refused by a tenant's limit (requests: max_concurrent_requests; cold_loads: max_cold_loads)",
            ["tenant", "limit"],
            registry=r,
        )
        self.packs_resident = Gauge("sensepack_packs_resident", "Pack versions in memory", registry=r)
        self.packs_resident_bytes = Gauge(
            "sensepack_packs_resident_bytes",
            "Bytes of the resident versions' edits (packs.max_resident_bytes)",
            registry=r,
        )
        self.pack_evictions = Counter(
            "sensepack_pack_evictions",
            "Versions evicted to stay within packs.max_resident and packs.max_resident_bytes",
            registry=r,
        )
        self.pack_load_seconds = Histogram(
            "sensepack_pack_load_seconds",
            "Cold load of a pack version: read, validation and the activation gate",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.gate_runs = Counter(
            "sensepack_gate_runs", "Activation gate measurements (cached per version, target model and G)", registry=r
        )
        self.gate_ratio = Gauge(
            "sensepack_gate_ball_ratio", "Ball ratio measured by the activation gate", ["pack", "version"], registry=r
        )
        self._active_labels: set[tuple[str, str, str]] = set()
        # series that exist from the start (dashboards and rate() need them before the first event)
        for method in GRPC_METHODS:
            self.requests.labels(method, "OK", GRPC)
        for method in HTTP_METHODS:
            self.requests.labels(method, "OK", HTTP)
        for result in ("ok", "refused_gate", "incompatible", "invalid", "not_found"):
            self.pack_loads.labels(result)
        for reason in ("header_timeout", "body_timeout", "over_limit", "disconnect"):
            self.http_cuts.labels(reason)

    def touch_tenants(self, names: list[str]) -> None:
        """Create every tenant's series at 0 (names: the configured tenants)."""
        for name in names:
            self.tenant_running.labels(name)
            for limit in ("requests", "cold_loads"):
                self.tenant_limited.labels(name, limit)

    def touch_pack(self, pack: str) -> None:
        """Create a resident pack's counters at 0, so that increase() sees its first breach."""
        self.ab_samples.labels(pack)
        self.ab_breaches.labels(pack)
        self.auto_disables.labels(pack)

    def drop_pack(self, pack: str) -> None:
        """No version of `pack` is in memory any more: remove its per-pack series, so that the series count
        follows the resident packs, not every pack a store of thousands ever served (they start again at 0
        when it comes back). Breach and auto-disable counters that counted something stay (alerts read them)."""
        for arm in ("pack", "base"):
            with contextlib.suppress(KeyError):
                self.requests_by_pack.remove(pack, arm)
        with contextlib.suppress(KeyError):
            self.ab_samples.remove(pack)
        for counter, name in (
            (self.ab_breaches, "sensepack_ab_breaches_total"),
            (self.auto_disables, "sensepack_pack_auto_disables_total"),
        ):
            if not self.registry.get_sample_value(name, {"pack": pack}):
                with contextlib.suppress(KeyError):
                    counter.remove(pack)

    def drop_gate(self, pack: str, version: str) -> None:
        """A version left memory: remove its gate series (bounded by the resident versions, as the A/B ones)."""
        with contextlib.suppress(KeyError):  # never gated (gate off) or already gone
            self.gate_ratio.remove(pack, version)

    def drop_version(self, pack: str, version: str) -> None:
        """A version's live record is gone: remove its A/B series (the series count stays bounded by the
        resident versions however many versions are cycled through)."""
        for g in (self.ab_ratio, self.ab_ci_lower, self.ab_ci_upper):
            with contextlib.suppress(KeyError):  # already gone
                g.remove(pack, version)

    def set_active_packs(self, routes: list[tuple[str, str, str]]) -> None:
        """routes: (pack, version, alias) with alias "" for the plain name route."""
        new = set(routes)
        for labels in self._active_labels - new:
            with contextlib.suppress(KeyError):  # already gone
                self.active_pack.remove(*labels)
        for labels in new:
            self.active_pack.labels(*labels).set(1)
        self._active_labels = new

    def serve_http(self, host: str, port: int):
        """Start the /metrics HTTP endpoint; returns (server, thread, bound port)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, thread, server.server_port
