"""Who is calling: generation API keys, each either open (``api.keys``: every pack) or a tenant's
(``api.tenants``: packs whose names start with one of the tenant's prefixes), on both front-ends.

A tenant names, lists and loads only its own packs. A pack outside its prefixes gets the same NOT_FOUND
(404 on HTTP) as a pack that does not exist, message included, so a tenant cannot learn whether another
tenant's pack exists. Each tenant may bound its concurrent requests and the cold pack loads its requests
trigger at once (RESOURCE_EXHAUSTED / 429 past either). Metrics carry a `tenant` label whose values are the
configured tenants' names (and "" for open keys): bounded by the config, never by the clients.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from collections.abc import Iterator

from serve.errors import PackNotFound, PermissionDenied, QueueFull, ServeError, Unauthenticated

OPEN = ""  # the tenant label of open keys (and of a server without keys)


class Tenant:
    """One tenant's scope and its live counters (requests in flight, cold loads in flight)."""

    def __init__(
        self, name: str, prefixes: tuple[str, ...], max_concurrent_requests: int | None = None, max_cold_loads: int = 1
    ):
        self.name = name
        self.prefixes = prefixes
        self.max_concurrent_requests = max_concurrent_requests
        self.max_cold_loads = max_cold_loads
        self._lock = threading.Lock()
        self.running = 0
        self.loading = 0

    def permits(self, pack_name: str) -> bool:
        return pack_name.startswith(self.prefixes)

    def hidden(self, field: str, ref: str) -> PackNotFound:
        """What a tenant hears about a pack it may not see, or that does not exist: the same words."""
        return PackNotFound(field, f"pack {ref!r} not found")

    def enter(self, metrics=None) -> None:
        """One more request in flight; QueueFull past max_concurrent_requests (call `leave` once after)."""
        with self._lock:
            if self.max_concurrent_requests is not None and self.running >= self.max_concurrent_requests:
                if metrics is not None:
                    metrics.tenant_limited.labels(self.name, "requests").inc()
                raise QueueFull(
                    "",
                    f"tenant {self.name!r}: {self.running} requests in flight "
                    f"(api.tenants max_concurrent_requests={self.max_concurrent_requests}); retry later",
                )
            self.running += 1
        if metrics is not None:
            metrics.tenant_running.labels(self.name).set(self.running)

    def leave(self, metrics=None) -> None:
        with self._lock:
            self.running -= 1
        if metrics is not None:
            metrics.tenant_running.labels(self.name).set(self.running)

    @contextlib.contextmanager
    def cold_load(self, field: str, metrics=None) -> Iterator[None]:
        """A request of this tenant loads a pack; QueueFull past max_cold_loads at once."""
        with self._lock:
            if self.loading >= self.max_cold_loads:
                if metrics is not None:
                    metrics.tenant_limited.labels(self.name, "cold_loads").inc()
                raise QueueFull(
                    field,
                    f"tenant {self.name!r}: {self.loading} pack loads in flight "
                    f"(api.tenants max_cold_loads={self.max_cold_loads}); retry later",
                )
            self.loading += 1
        try:
            yield
        finally:
            with self._lock:
                self.loading -= 1


class Tenants:
    """Keys -> caller. `identify(header)` returns None for an open key (or when no key is configured at all)
    and the Tenant for a tenant's key; a missing or wrong key is Unauthenticated / PermissionDenied."""

    def __init__(self, api_config) -> None:
        self.tenants: dict[str, Tenant] = {}
        self._keys: list[tuple[bytes, Tenant | None]] = [(k.encode(), None) for k in api_config.resolved_keys()]
        owner: dict[bytes, str] = {k: "api.keys" for k, _ in self._keys}
        for i, t in enumerate(api_config.tenants):
            tenant = Tenant(t.name, tuple(t.packs), t.max_concurrent_requests, t.max_cold_loads)
            self.tenants[t.name] = tenant
            for key in t.resolved_keys():
                b = key.encode()
                if b in owner:
                    raise ValueError(f"api.tenants[{i}].keys: a key of tenant {t.name!r} is also one of {owner[b]}")
                owner[b] = f"tenant {t.name!r}"
                self._keys.append((b, tenant))

    @property
    def names(self) -> list[str]:
        return [OPEN, *self.tenants]

    def identify(self, header: str | None) -> Tenant | None:
        if not self._keys:
            return None
        if header is None:
            raise Unauthenticated("authorization", "missing 'Bearer <api key>' (api.keys or api.tenants is set)")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization", "expected 'Bearer <api key>'")
        given = token.strip().encode()
        found: Tenant | None = None
        ok = False
        for key, tenant in self._keys:  # every key compared, in constant time each: no early exit
            match = hmac.compare_digest(given, key)
            ok |= match
            if match:
                found = tenant
        if not ok:
            raise PermissionDenied("authorization", "api key not accepted")
        return found

    def check(self, header: str | None) -> ServeError | None:
        """identify's refusal as a value (None: let in)."""
        try:
            self.identify(header)
        except ServeError as e:
            return e
        return None
