"""Pack manager: what requests name (routes), admission (pin, β, A/B arm), hot swaps and the store's
notifications, over the resident versions of serve.pack_cache.

* A **route** maps what requests name to a version: ``name`` (the active
  version) and ``name@alias`` (a store alias). Explicit ``name@version`` needs
  no route. Activation (admin LoadPack/SetAlias, or a store notification that
  an alias moved) swaps routes atomically under one lock. Admin-routed
  versions stay in memory whatever the residency budget. A request that loads
  a pack (``packs.load_on_request``) leaves a *request route*: it saves the
  next request a store lookup, does not hold the version in memory, and goes
  when the version is evicted or the store changes anything of that name.
* Every admitted request pins the versions it resolved; swaps never touch
  running requests.
* A disabled version (live A/B breach) or one deleted from the store leaves
  its routes; each route falls back to its previous target, or to the base
  model when there is none.
* Packs change only through the admin API or the store's aliases. A request
  may load a version only when the operator allows it (``packs.load_on_request``,
  off in the production profiles), and even then it never re-enables a disabled
  version, never brings back an unloaded one (UnloadPack holds until an admin
  LoadPack/SetAlias), never moves an existing route, and its gate run is bounded
  by the request's deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edits_store.errors import PackError, PackNotFoundError
from edits_store.references import parse_pack_reference
from ensemble.edits import PackRef
from serve.errors import PackNotFound, ServeError, Unavailable, from_pack_error
from serve.pack_cache import GateFn, PackCache, Resident, ResidentTable, StoreAPI
from serve.params import PackRequest, invalid, parse_pack_ref
from serve.tenants import Tenant

log = logging.getLogger("sensepack.packs")


BASE = None  # a route target meaning "the base model takes over"


@dataclass
class Pin:
    """One pack as one request uses it (arm 'base': A/B control or disabled pack)."""

    request: PackRequest
    resident: Resident | None
    beta: float
    arm: str
    in_experiment: bool = False

    @property
    def name(self) -> str:
        return self.request.name

    @property
    def version(self) -> str:
        return self.resident.version if self.resident is not None else ""


class Admission:
    """The pinned packs of one request; `release()` exactly once when it ends."""

    def __init__(self, manager: PackManager, pins: list[Pin]):
        self._manager = manager
        self.pins = pins
        self._released = False
        self._then: list[Callable[[], None]] = []

    def on_release(self, fn: Callable[[], None]) -> None:
        """Also call `fn` at release (the request's slot among its tenant's)."""
        self._then.append(fn)

    @property
    def pack_refs(self) -> list[PackRef]:
        return [p.resident.pack_ref(p.beta) for p in self.pins if p.arm == "pack" and p.resident is not None]

    def release(self) -> None:
        if not self._released:
            self._released = True
            try:
                self._manager._release(self.pins)
            finally:
                for fn in self._then:
                    fn()


class ArmPolicy(Protocol):
    """The live A/B monitor as the pack manager sees it (serve.abtest.LiveMonitor)."""

    def assign(self, pack: str, key: str) -> tuple[str, bool]: ...
    def reset(self, pack: str, version: str) -> None: ...
    def forget(self, pack: str, version: str) -> None: ...
    def on_breach(self, callback: Callable[[str, str, str], list[str]]) -> None: ...


class PackManager:
    """`source`: the pack store; `gate(resident) -> GateResult`; `ab`: the live monitor, which reports
    confirmed breaches back through `on_breach` (auto-disable)."""

    def __init__(
        self,
        source: StoreAPI,
        expectations,
        target_fingerprint: str,
        config,
        metrics,
        gate: GateFn | None = None,
        ab: ArmPolicy | None = None,
        residents: ResidentTable | None = None,
    ):
        self.cache = PackCache(
            source,
            expectations,
            target_fingerprint,
            config,
            metrics,
            gate=gate,
            residents=residents,
            forget=ab.forget if ab is not None else None,
        )
        self.cache.held = self._admin_routed
        self.cache.on_drop = self._on_cache_drop
        self.source = source
        self.cfg = config  # the full Config (packs, gate, ab sections)
        self.metrics = metrics
        self.ab = ab
        self._lock = self.cache.lock  # one lock for routes and residents: swaps see both at once
        self._routes: dict[str, Resident | None] = {}
        self._request_routes: dict[str, Resident] = {}  # made by request loads; never hold a version in memory
        self._history: dict[str, list[Resident]] = {}
        self._activation_lock = threading.Lock()
        self._subscription = None
        self.swaps = 0
        if ab is not None:
            ab.on_breach(self._on_breach)

    def _admin_routed(self) -> set[int]:
        return {id(r) for r in self._routes.values() if r is not None}

    def _drop_request_routes(self, r: Resident) -> bool:
        """Forget the request routes to r (under the lock); True when there were some."""
        gone = [k for k, v in self._request_routes.items() if v is r]
        for route in gone:
            del self._request_routes[route]
        return bool(gone)

    def _on_cache_drop(self, r: Resident) -> None:
        if self._drop_request_routes(r):
            self._publish_routes()

    def _all_routes(self) -> dict[str, Resident | None]:
        """Admin routes and request routes (an admin route wins): what each route serves now."""
        out: dict[str, Resident | None] = dict(self._request_routes)
        out.update(self._routes)
        return out

    # ------------------------------------------------------------ resolving
    def _resolve_route(self, name: str, tag: str | None) -> tuple[bool, Resident | None, str | None]:
        """(found, resident-or-base, alias) for a route, without loading."""
        route = name if tag is None else f"{name}@{tag}"
        with self._lock:
            if route in self._routes:
                return True, self._routes[route], tag
            r = self._request_routes.get(route)
            if r is not None and r.state in ("resident", "disabled"):
                return True, r, tag
            if tag is not None:
                r = self.cache.table.get((name, tag))
                if r is not None and r.state not in ("freed", "unloading"):  # unloaded: no new pins
                    return True, r, None
        return False, None, tag

    def resolve(
        self,
        pr: PackRequest,
        field_name: str | None = None,
        deadline: float | None = None,
        tenant: Tenant | None = None,
    ) -> Resident | None:
        """Resident for a request's pack (None: base takes over); loads on demand when configured.

        On-demand loading makes request routes (they hold nothing in memory)
        for what was named and had no route yet: ``name`` to the store's
        default version, ``name@alias`` to its alias's; ``name@version`` needs
        none. A disabled version is never routed nor re-enabled this way (the
        request is served by the base model).
        """
        f = (field_name or pr.field) + ".ref"
        found, r, _ = self._resolve_route(pr.name, pr.tag)
        if found:
            return r
        if not self.cfg.packs.load_on_request:
            raise PackNotFound(f, f"pack {pr.ref!r} is not loaded (packs.load_on_request is off)")
        bound = time.monotonic() + self.cfg.packs.request_load_timeout_s
        deadline = bound if deadline is None else min(deadline, bound)
        try:
            with tenant.cold_load(f, self.metrics) if tenant is not None else contextlib.nullcontext():
                _, version, r = self._load_ref(pr.ref, by_request=True, deadline=deadline)
        except ServeError as e:
            raise e.at(f) from None
        if r.state != "resident":
            return r
        if pr.tag != version:
            route = pr.name if pr.tag is None else f"{pr.name}@{pr.tag}"
            with self._lock:
                if route not in self._routes and r.state == "resident" and route not in self._request_routes:
                    self._request_routes[route] = r
                    self._publish_routes()
        found, r2, _ = self._resolve_route(pr.name, pr.tag)
        return r2 if found else r

    def admit(
        self, packs: list[PackRequest], ab_key: str = "", deadline: float | None = None, tenant: Tenant | None = None
    ) -> Admission:
        """Resolve, check β, assign A/B arms and pin; raises a ServeError naming the field. A tenant's request
        sees only the tenant's packs: any other, like a pack that does not exist, is `tenant.hidden`."""
        pins: list[Pin] = []
        try:
            for pr in packs:
                if tenant is not None and not tenant.permits(pr.name):
                    raise tenant.hidden(pr.field + ".ref", pr.ref)
                for _attempt in range(3):
                    try:
                        r = self.resolve(pr, deadline=deadline, tenant=tenant)
                    except PackNotFound:
                        if tenant is None:
                            raise
                        raise tenant.hidden(pr.field + ".ref", pr.ref) from None
                    with self._lock:
                        if r is not None and r.state == "freed":
                            continue  # evicted between resolve and pin: resolve again
                        if r is None or r.state == "disabled":
                            pin = Pin(pr, None, 0.0, "base")
                        else:
                            beta = self._check_beta(pr, r)
                            self.cache.pin(r)
                            pin = Pin(pr, r, beta, "pack")
                    break
                else:
                    raise Unavailable(
                        pr.field + ".ref", f"pack {pr.ref!r} was unloaded while admitting the request; retry"
                    )
                if pin.resident is not None and self.ab is not None:
                    pin.arm, pin.in_experiment = self.ab.assign(pr.name, ab_key)
                pins.append(pin)
        except BaseException:
            self._release(pins)
            raise
        for p in pins:
            self.metrics.requests_by_pack.labels(p.name, p.arm).inc()
        return Admission(self, pins)

    def _check_beta(self, pr: PackRequest, r: Resident) -> float:
        if pr.beta is None:
            return r.calibrated_beta
        cap = r.calibrated_beta
        if self.cfg.packs.allow_beta_above_calibrated:
            cap = self.cfg.packs.max_beta if self.cfg.packs.max_beta is not None else float("inf")
        if pr.beta > cap:
            raise invalid(
                pr.field + ".beta",
                f"{pr.beta:g} above the calibrated beta {r.calibrated_beta:g} of {r.ref} for the served model"
                if not self.cfg.packs.allow_beta_above_calibrated
                else f"{pr.beta:g} above packs.max_beta {cap:g}",
            )
        return float(pr.beta)

    def _release(self, pins: list[Pin]) -> None:
        for p in pins:
            if p.resident is not None:
                self.cache.unpin(p.resident)

    # ------------------------------------------------------------ activation / hot swap
    def _load_ref(self, ref: str, by_request: bool = False, deadline: float | None = None) -> tuple[str, str, Resident]:

        try:
            name, version = self.source.resolve(ref)
        except PackNotFoundError as e:
            self.metrics.pack_loads.labels("not_found").inc()
            raise PackNotFound("", f"unknown pack {ref!r}: {e}") from None
        except PackError as e:
            raise from_pack_error(e, "", f"pack {ref!r}: {e}") from None
        return name, version, self.cache.get(name, version, by_request, deadline)

    def activate(self, ref: str, activate: bool = True) -> tuple[Resident, list[str]]:
        """Load (and gate) `ref`; with activate, route ``name`` (and ``name@alias``) to it."""
        parsed = parse_pack_ref(ref, "ref")
        name, tag = parsed.name, parsed.selector
        try:
            _, version, r = self._load_ref(ref)
        except ServeError as e:
            raise type(e)("ref", e.message) from None
        self._enable(r)
        routes: list[str] = []
        if activate:
            alias = tag if tag is not None and tag != version else None
            routes = [name] + ([f"{name}@{alias}"] if alias else [])
            self._set_routes(routes, r)
        return r, routes

    def _enable(self, r: Resident) -> None:
        """An admin call names this version: it is no longer unloaded or disabled (fresh live A/B record)."""
        with self._lock:
            key = (r.name, r.version)
            self.cache.unloaded.discard(key)
            if (self.cache.disabled.pop(key, None) is not None or r.state == "disabled") and self.ab is not None:
                self.ab.reset(r.name, r.version)
            if r.state in ("unloading", "disabled"):
                r.state = "resident"

    def _set_routes(self, routes: list[str], r: Resident | None, only_if_absent: bool = False) -> None:
        with self._lock:
            if only_if_absent:
                routes = [x for x in routes if x not in self._routes]
                if not routes:
                    return
            if r is not None and r.state != "resident":
                return  # only _enable (an admin call) brings a version back
            for route in routes:
                old = self._routes.get(route)
                if old is r and route in self._routes:
                    continue
                if old is not None:
                    hist = self._history.setdefault(route, [])
                    hist.append(old)
                    del hist[:-8]
                self._routes[route] = r
            self.swaps += 1
            self._publish_routes()
        log.info("routes updated", extra={"event": "pack_activated", "routes": routes, "pack": r.ref if r else "base"})

    def set_alias(self, name: str, alias: str, version: str) -> tuple[Resident, list[str]]:
        """Admin hot swap: load + gate the version first, then move the store alias and the routes.

        Serialized with store notifications so that the routes end equal to the store's alias.
        """
        r, _ = self.activate(f"{name}@{version}", activate=False)
        with self._activation_lock:
            self.source.set_alias(name, alias, version)
            routes = [name, f"{name}@{alias}"]
            self._set_routes(routes, r)
        return r, routes

    def unload(self, ref: str) -> tuple[str, str, bool]:
        parsed = parse_pack_ref(ref, "ref")
        name, tag = parsed.name, parsed.selector
        with self._lock:
            if tag is None:
                r = self._routes.get(name)
            else:
                r = self._routes.get(f"{name}@{tag}") or self.cache.table.get((name, tag))
            if r is None:
                r = self._request_routes.get(name if tag is None else f"{name}@{tag}")
            if r is None:
                raise PackNotFound("ref", f"pack {ref!r} is not resident")
            for route in [k for k, v in self._routes.items() if v is r]:
                del self._routes[route]
            self._drop_request_routes(r)
            for hist in self._history.values():
                hist[:] = [h for h in hist if h is not r]
            r.state = "unloading"
            self.cache.unloaded.add((r.name, r.version))
            freed = r.refcount == 0
            if freed:
                self.cache.free(r)
            self._publish_routes()
        log.info("pack unloaded", extra={"event": "pack_unloaded", "pack": r.ref, "freed": freed})
        return r.name, r.version, freed

    def disable(self, name: str, version: str, reason: str) -> list[str]:
        """Take a version out of service: its routes fall back to their previous target or to base."""
        with self._lock:
            self.cache.disabled[(name, version)] = reason
            r = self.cache.table.get((name, version))
            if r is None:
                return []
            r.state = "disabled"
            moved = self._fall_back(r)
        log.error(
            "pack disabled",
            extra={"event": "pack_disabled", "pack": f"{name}@{version}", "reason": reason, "routes": moved},
        )
        return moved

    def _fall_back(self, r: Resident) -> list[str]:
        """r leaves service (disabled, or withdrawn from the store): each of its routes falls back to its
        previous target, or to base; its request routes go (the next request asks the store again)."""
        self._drop_request_routes(r)
        moved = []
        for route, target in list(self._routes.items()):
            if target is not r:
                continue
            hist = self._history.get(route, [])
            fallback = BASE
            while hist:
                cand = hist.pop()
                if cand is not r and cand.state == "resident":
                    fallback = cand
                    break
            self._routes[route] = fallback
            moved.append(f"{route}->{fallback.ref if fallback else 'base'}")
        self._publish_routes()
        return moved

    def withdraw(self, name: str, version: str) -> list[str]:
        """The store deleted this version: no new request gets it (its routes fall back as for a disabled
        version, `name@version` is NOT_FOUND); running requests finish with it, and it leaves memory with
        the last of them."""
        with self._lock:
            r = self.cache.table.get((name, version))
            if r is None or r.state in ("freed", "unloading"):
                return []
            moved = self._fall_back(r)
            r.state = "unloading"
            if r.refcount == 0:
                self.cache.free(r)
        log.warning(
            "pack withdrawn",
            extra={"event": "pack_withdrawn", "pack": f"{name}@{version}", "reason": "deleted from the store"},
        )
        return moved

    def _on_breach(self, name: str, version: str, reason: str) -> list[str]:
        """The live monitor confirmed a breach and auto-disable is on."""
        return self.disable(name, version, reason)

    def _publish_routes(self) -> None:
        labels = []
        for route, r in self._all_routes().items():
            if r is None:
                continue
            alias = route.split("@", 1)[1] if "@" in route else ""
            labels.append((r.name, r.version, alias))
        self.metrics.set_active_packs(labels)

    # ------------------------------------------------------------ store notifications
    def watched_names(self) -> set[str]:
        """The pack names whose store changes matter here: those routed (by an admin, a request or a route's
        history) or with a version in memory. The subscription lists only these at each poll."""
        with self._lock:
            routes = [*self._routes, *self._request_routes, *self._history]
            names = {route.partition("@")[0] for route in routes}
            names.update(name for name, _ in self.cache.table)
        return names

    def on_store_event(self, event) -> None:
        """An alias moved in the store: hot-swap the routes that follow it (gate first); a version deleted
        from the store is withdrawn (`withdraw`); any change under a name drops its request routes; a name the
        subscription starts watching has its alias routes looked up again (they were resolved before it did).

        The alias is re-read at handling time (events can be stale when admin
        calls move it too); a refused version leaves the routes as they are.
        """
        kind = getattr(event, "kind", "alias_moved")
        name, alias = getattr(event, "name", None), getattr(event, "alias", None)
        if name:  # anything changed under this name: request routes ask the store again
            with self._lock:
                stale = [k for k in self._request_routes if k == name or k.startswith(name + "@")]
                for route in stale:
                    del self._request_routes[route]
                if stale:
                    self._publish_routes()
        if kind == "version_deleted" and name and getattr(event, "version", None):
            self.withdraw(name, event.version)
            return
        if kind == "watch_started" and name:
            with self._lock:
                refs = [parse_pack_reference(r) for r in self._routes if r.startswith(name + "@")]
            for ref in refs:
                if ref.is_alias:
                    assert ref.selector is not None  # is_alias says so
                    self._follow_alias(name, ref.selector)
            return
        if kind not in ("alias_moved", "alias_removed") or not (name and alias):
            return
        route = f"{name}@{alias}"
        if kind == "alias_removed":  # requests naming it get NOT_FOUND (or a fresh resolve) from now on
            with self._lock:
                if self._routes.pop(route, None) is not None or route in self._history:
                    self._history.pop(route, None)
                    self._publish_routes()
                    log.info("route removed", extra={"event": "route_removed", "route": route})
            return
        self._follow_alias(name, alias)

    def _follow_alias(self, name: str, alias: str) -> None:
        """Point the routes that follow name@alias at the version the store's alias names now (gate first)."""
        route = f"{name}@{alias}"
        with self._lock:
            if route not in self._routes:
                return

        with self._activation_lock:
            try:
                _, version = self.source.resolve(route)
            except PackError as e:  # alias removed meanwhile (anything else is logged by the subscription)
                log.warning("alias vanished", extra={"event": "alias_move_ignored", "route": route, "reason": str(e)})
                return
            with self._lock:
                current = self._routes.get(route)
                if current is not None and current.version == version:
                    return
            with self._lock:
                disabled = self.cache.disabled.get((name, version))
            if disabled is not None:  # the store alias still names a disabled version: it stays out
                log.warning(
                    "alias move ignored",
                    extra={
                        "event": "alias_move_refused",
                        "route": route,
                        "version": version,
                        "reason": f"disabled: {disabled}",
                    },
                )
                return
            try:
                r = self.cache.get(name, version)
            except ServeError as e:
                log.warning(
                    "alias move refused",
                    extra={"event": "alias_move_refused", "route": route, "version": version, "reason": e.message},
                )
                return
            with self._lock:
                self.cache.unloaded.discard((name, version))  # the store's operator moved the alias to it
            self._set_routes([name, route], r)

    def subscribe(self, interval_s: float) -> None:
        """Watch the store for changes under `watched_names` (asked again at every poll)."""
        sub = getattr(self.source, "subscribe", None)
        if sub is not None:
            self._subscription = sub(self.on_store_event, interval_s, names=self.watched_names)

    def close(self) -> None:
        if self._subscription is not None:
            try:
                self._subscription.close()
            except Exception:  # shutting down: say why the poller did not stop cleanly, and go on
                log.exception("store subscription close failed", extra={"event": "subscription_close_failed"})
            self._subscription = None

    # ------------------------------------------------------------ views
    def routes(self) -> dict[str, Resident | None]:
        with self._lock:
            return self._all_routes()

    def residents(self) -> list[Resident]:
        return self.cache.residents()

    def refused(self) -> dict[str, str]:
        return self.cache.refused()

    def state_of(self, r: Resident) -> str:
        with self._lock:
            if r.state != "resident":
                return r.state
            return "active" if any(v is r for v in self._all_routes().values()) else "resident"

    def routes_of(self, r: Resident) -> list[str]:
        with self._lock:
            return sorted(k for k, v in self._all_routes().items() if v is r)


def sticky_fraction(*parts: str) -> float:
    h = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64
