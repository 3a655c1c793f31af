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
import hashlib
import hmac
import re
import threading
from collections.abc import Iterator

from serve.errors import PackNotFound, PermissionDenied, QueueFull, ServeError, Unauthenticated

OPEN = ""  # the tenant label of open keys (and of a server without keys)
TENANT_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


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
    and the Tenant for a tenant's key; a missing or wrong key is Unauthenticated / PermissionDenied.

    Keys are kept as sha256 digests only. `set` / `remove` change tenants at runtime (the admin API) on this
    process; the config is what a restart reads."""

    def __init__(self, api_config) -> None:
        self._lock = threading.Lock()
        self.tenants: dict[str, Tenant] = {}
        self.source: dict[str, str] = {}  # name -> "config" | "admin"
        self._open: set[bytes] = {_digest(k) for k in api_config.resolved_keys()}
        self._keys: dict[bytes, Tenant] = {}
        for i, t in enumerate(api_config.tenants):
            err = self._check_keys(t.resolved_keys(), t.name)
            if err:
                raise ValueError(f"api.tenants[{i}].keys: {err}")
            self._put(
                Tenant(t.name, tuple(t.packs), t.max_concurrent_requests, t.max_cold_loads), t.resolved_keys(), "config"
            )

    def _check_keys(self, keys: list[str], name: str) -> str | None:
        """Why these keys cannot be tenant `name`'s (None: they can)."""
        for key in keys:
            d = _digest(key)
            if d in self._open:
                return f"a key of tenant {name!r} is also one of api.keys"
            owner = self._keys.get(d)
            if owner is not None and owner.name != name:
                return f"a key of tenant {name!r} is also one of tenant {owner.name!r}"
        return None

    def _put(self, tenant: Tenant, keys: list[str], source: str) -> Tenant:
        old = self.tenants.get(tenant.name)
        if old is not None:  # in place: its requests in flight keep counting against it
            old.prefixes, old.max_concurrent_requests, old.max_cold_loads = (
                tenant.prefixes,
                tenant.max_concurrent_requests,
                tenant.max_cold_loads,
            )
            tenant = old
        keys_now = {d: t for d, t in self._keys.items() if t is not tenant}
        keys_now.update({_digest(k): tenant for k in keys})
        self._keys = keys_now  # replaced whole: `identify` reads one dict or the other, never half
        self.tenants[tenant.name] = tenant
        self.source[tenant.name] = source
        return tenant

    def set(self, tenant: Tenant, keys: list[str]) -> Tenant:
        """Add or replace a tenant (the admin API); ValueError naming what is wrong."""
        if not keys or any(not k for k in keys):
            raise ValueError("keys: at least one non-empty key")
        if not tenant.prefixes or any(not p for p in tenant.prefixes):
            raise ValueError("packs: at least one prefix, none empty (an empty prefix would open every pack)")
        with self._lock:
            err = self._check_keys(keys, tenant.name)
            if err:
                raise ValueError(f"keys: {err}")
            return self._put(tenant, keys, "admin")

    def remove(self, name: str) -> bool:
        with self._lock:
            t = self.tenants.pop(name, None)
            self.source.pop(name, None)
            if t is None:
                return False
            self._keys = {d: x for d, x in self._keys.items() if x is not t}
            return True

    def keys_of(self, name: str) -> int:
        t = self.tenants.get(name)
        return sum(1 for x in self._keys.values() if x is t)

    def identify(self, header: str | None) -> Tenant | None:
        keys, open_keys = self._keys, self._open  # one consistent view (set/remove replace, never mutate)
        if not keys and not open_keys:
            return None
        if header is None:
            raise Unauthenticated("authorization", "missing 'Bearer <api key>' (api.keys or api.tenants is set)")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization", "expected 'Bearer <api key>'")
        given = _digest(token.strip())
        if any(hmac.compare_digest(given, d) for d in open_keys):
            return None
        for d, tenant in keys.items():
            if hmac.compare_digest(given, d):
                return tenant
        raise PermissionDenied("authorization", "api key not accepted")

    def check(self, header: str | None) -> ServeError | None:
        """identify's refusal as a value (None: let in)."""
        try:
            self.identify(header)
        except ServeError as e:
            return e
        return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
