"""Pack manager: resident pack versions, routes, pinning and hot swaps.

* A **resident** version is loaded from the store, validated against the served
  Backpack / tokenizer / large model (edits_store `Expectations`), and has
  passed the activation gate (serve.abtest). Refused versions are remembered
  with the reason; the previously routed version keeps serving.
* A **route** maps what requests name to a version: ``name`` (the active
  version) and ``name@alias`` (a store alias). Explicit ``name@version`` needs
  no route. Activation (admin LoadPack/SetAlias, or a store notification that
  an alias moved) swaps routes atomically under one lock. A request that loads
  a pack (``packs.load_on_request``) leaves a *request route*: it saves the
  next request a store lookup, does not hold the version in memory, and goes
  when the version is evicted or the store changes anything of that name.
* **Residency** is bounded by count and bytes (``packs.max_resident``,
  ``packs.max_resident_bytes``): past either, unpinned versions no admin route
  holds are evicted, least recently used first. Pinned and admin-routed
  versions are never evicted (the operator and the running requests bound them).
* Every admitted request **pins** the versions it resolved (a reference count);
  swaps never touch running requests, and an unloaded version is freed only
  when its count drops to 0.
* A disabled version (live A/B breach) leaves its routes; each route falls back
  to its previous target, or to the base model when there is none.
* Packs change only through the admin API or the store's aliases. A request
  may load a version only when the operator allows it (``packs.load_on_request``,
  off in the production profiles), and even then it never re-enables a disabled
  version, never brings back an unloaded one (UnloadPack holds until an admin
  LoadPack/SetAlias), never moves an existing route, and its gate run is bounded
  by the request's deadline. Gate results are cached per (version, target
  model, G, β, ε): eviction and reloading do not re-gate.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from edits_store.errors import IncompatiblePackError, MissingBetaError, PackError, PackNotFoundError
from edits_store.format import CalibrationEntry, PackContents
from edits_store.signing import public_raw
from ensemble.edits import PackRef, SenseEdits
from serve.errors import DeadlineExceeded, PackNotFound, PackRefused, ServeError, Unavailable, from_pack_error
from serve.params import PackRequest, invalid, parse_pack_ref
from serve.tenants import Tenant

log = logging.getLogger("sensepack.packs")


def served_edits(contents: PackContents, target_fingerprint: str) -> tuple[SenseEdits, CalibrationEntry]:
    """A loaded pack as the engine applies it to one large model: its edits (own tensors, not the loaded
    pack's) and the calibration entry (β, ε) for that model (MissingBetaError when it has none)."""
    entry = contents.manifest.beta_for(target_fingerprint)
    edits = SenseEdits(contents.token_ids.clone(), contents.sense_ids.clone(), contents.deltas.clone())
    return edits, entry


BASE = None  # a route target meaning "the base model takes over"


@dataclass
class GateResult:
    passed: bool
    ratio: float
    epsilon: float
    beta: float
    tokens: int
    skipped: bool = False


@dataclass
class Resident:
    name: str
    version: str
    edits: SenseEdits
    calibrated_beta: float
    epsilon: float
    manifest: object = None
    gate: GateResult | None = None
    refcount: int = 0
    state: str = "resident"  # resident | unloading | disabled | freed
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def nbytes(self) -> int:
        """Memory the version holds: its edit tensors (what packs.max_resident_bytes counts)."""
        e = self.edits
        return int(e.token_ids.nbytes + e.sense_ids.nbytes + e.deltas.nbytes)

    def pack_ref(self, beta: float | None = None) -> PackRef:
        return PackRef(self.name, self.version, self.edits, self.calibrated_beta if beta is None else beta)


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


class StoreAPI(Protocol):
    """Where versions come from (edits_store.PackStore, or any store with this surface)."""

    def load(self, ref: str, expect): ...
    def resolve(self, ref: str) -> tuple[str, str]: ...
    def set_alias(self, name: str, alias: str, version: str) -> None: ...


class GateFn(Protocol):
    """The activation gate (serve.abtest.Gate): measures a version's ball ratio."""

    fingerprint: str | None

    def __call__(self, r: Resident, deadline: float | None = None) -> GateResult: ...


class ArmPolicy(Protocol):
    """The live A/B monitor as the pack manager sees it (serve.abtest.LiveMonitor)."""

    def assign(self, pack: str, key: str) -> tuple[str, bool]: ...
    def reset(self, pack: str, version: str) -> None: ...
    def forget(self, pack: str, version: str) -> None: ...
    def on_breach(self, callback: Callable[[str, str, str], list[str]]) -> None: ...


class ResidentTable(dict):
    """(name, version) -> Resident, owned by one PackManager (mutated under its lock). Built before the
    manager so that an engine can read resident edits from it (serve.vllm.resolver.PackManagerSource)
    without depending on the manager."""

    def residents(self) -> list[Resident]:
        return list(self.values())


def _with_trusted_keys(expect, keys):
    """packs.trusted_keys set: only packs signed by one of these ed25519 keys load (edits_store SignatureError,
    whose message names the failed check: signature_present, signature_key, signature)."""
    if not keys:
        return expect
    import dataclasses

    return dataclasses.replace(expect, trusted_keys=tuple(public_raw(k) for k in keys))


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
        self.source = source
        self.expect = _with_trusted_keys(expectations, config.packs.trusted_keys)
        self.target_fingerprint = target_fingerprint
        self.cfg = config  # the full Config (packs, gate, ab sections)
        self.metrics = metrics
        self.gate = gate
        self.ab = ab
        self._lock = threading.RLock()
        self._resident: ResidentTable = residents if residents is not None else ResidentTable()
        self._routes: dict[str, Resident | None] = {}
        self._request_routes: dict[str, Resident] = {}  # made by request loads; never hold a version in memory
        self._history: dict[str, list[Resident]] = {}
        self._refused: dict[str, tuple[type[ServeError], str]] = {}
        self._loading: dict[tuple[str, str], Future] = {}
        self._disabled: dict[tuple[str, str], str] = {}  # version -> reason; survives eviction
        self._unloaded: set[tuple[str, str]] = set()  # UnloadPack'ed; requests may not reload them
        self._gate_cache: dict[tuple, GateResult] = {}
        self._activation_lock = threading.Lock()
        self._subscription = None
        self.swaps = 0
        if ab is not None:
            ab.on_breach(self._on_breach)

    # ------------------------------------------------------------ loading
    def _load(self, name: str, version: str, by_request: bool = False, deadline: float | None = None) -> Resident:
        """Load + validate + gate one version (deduplicated); raises a ServeError.

        by_request: a request asked (load_on_request): an unloaded version stays unloaded, and the gate
        runs within `deadline` (time.monotonic()).
        """
        key = (name, version)
        with self._lock:
            if by_request and key in self._unloaded:
                raise PackNotFound(
                    "",
                    f"pack {name}@{version} was unloaded by an operator (PackAdmin.UnloadPack); "
                    "an admin LoadPack or SetAlias brings it back",
                )
            r = self._resident.get(key)
            if r is not None and r.state in ("resident", "disabled"):
                return r
            if r is not None and r.state == "unloading":  # admin reload before it was freed
                r.state = "resident"
                return r
            refused = self._refused.get(f"{name}@{version}")
            if refused is not None:
                raise refused[0]("", refused[1])
            fut = self._loading.get(key)
            owner = fut is None
            if fut is None:
                fut = self._loading[key] = Future()
        if not owner:
            try:
                return fut.result(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                raise DeadlineExceeded("", f"pack {name}@{version}: deadline exceeded while it loads") from None
        try:
            r = self._load_uncached(name, version, deadline)
            with self._lock:
                if key in self._disabled:  # a disabled version stays disabled after eviction and reload
                    r.state = "disabled"
                self._resident[key] = r
                self._evict(keep=key)
            fut.set_result(r)
            return r
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _refuse(self, ref: str, message: str, result: str) -> PackRefused:
        with self._lock:
            self._refused[ref] = (PackRefused, message)
        self.metrics.pack_loads.labels(result).inc()
        log.warning("pack refused", extra={"event": "pack_refused", "pack": ref, "result": result, "reason": message})
        return PackRefused("", message)

    def _load_uncached(self, name: str, version: str, deadline: float | None = None) -> Resident:

        ref = f"{name}@{version}"
        t0 = time.perf_counter()
        try:
            contents = self.source.load(ref, self.expect)
            edits, entry = served_edits(contents, self.target_fingerprint)
        except PackNotFoundError as e:
            self.metrics.pack_loads.labels("not_found").inc()
            raise PackNotFound("", f"pack {ref}: {e}") from None
        except (IncompatiblePackError, MissingBetaError) as e:
            raise self._refuse(ref, f"pack {ref} refused: {e}", "incompatible") from None
        except PackError as e:  # malformed or untrusted contents: this version cannot serve here
            raise self._refuse(ref, f"pack {ref} refused (invalid): {e}", "invalid") from None
        eps = self.cfg.gate.epsilon
        if eps is None:
            eps = float(getattr(entry, "epsilon", contents.manifest.epsilon))
        r = Resident(name, version, edits, float(entry.beta), float(eps), manifest=contents.manifest)
        if self.gate is not None and self.cfg.gate.enabled:
            g = self._gated(r, deadline)
            r.gate = g
            self.metrics.gate_ratio.labels(name, version).set(g.ratio)
            if not g.passed:
                raise self._refuse(
                    ref,
                    f"pack {ref} refused by the ball gate: ratio {g.ratio:.6f} > 1+epsilon "
                    f"({1 + g.epsilon:.6f}) at beta {g.beta:g} over {g.tokens} tokens",
                    "refused_gate",
                )
        self.metrics.pack_loads.labels("ok").inc()
        self.metrics.pack_load_seconds.observe(time.perf_counter() - t0)
        self.metrics.touch_pack(name)
        log.info(
            "pack loaded",
            extra={
                "event": "pack_loaded",
                "pack": ref,
                "beta": r.calibrated_beta,
                "gate_ratio": r.gate.ratio if r.gate else None,
                "seconds": round(time.perf_counter() - t0, 4),
            },
        )
        return r

    def _gated(self, r: Resident, deadline: float | None) -> GateResult:
        """The gate's verdict on r, measured once per (version, target model, G, β, ε)."""
        if self.gate is None:
            raise RuntimeError("PackManager._gated: no gate was configured (the caller checks gate.enabled)")
        key = (
            r.name,
            r.version,
            self.target_fingerprint,
            getattr(self.gate, "fingerprint", None),
            r.calibrated_beta,
            r.epsilon,
        )
        with self._lock:
            g = self._gate_cache.get(key)
        if g is not None:
            return g
        try:
            g = self.gate(r, deadline=deadline) if deadline is not None else self.gate(r)
        except TimeoutError:
            raise DeadlineExceeded(
                "",
                f"pack {r.ref}: the request's deadline ended during the activation gate "
                "(load it with PackAdmin.LoadPack first)",
            ) from None
        self.metrics.gate_runs.inc()
        with self._lock:
            self._gate_cache[key] = g
        return g

    def _evict(self, keep: tuple[str, str] | None = None) -> None:
        """Stay within packs.max_resident versions and packs.max_resident_bytes: drop unpinned versions no admin
        route holds, least recently used first; never `keep` (just loaded for a request that has not pinned it
        yet). Pinned and admin-routed versions may hold the server over budget (bounded by the running requests
        and the operator)."""
        limit, budget = self.cfg.packs.max_resident, self.cfg.packs.max_resident_bytes
        count, size = len(self._resident), sum(r.nbytes for r in self._resident.values())
        if count > limit or size > budget:
            routed = {id(r) for r in self._routes.values() if r is not None}
            victims = sorted(
                (r for key, r in self._resident.items() if id(r) not in routed and r.refcount == 0 and key != keep),
                key=lambda r: r.last_used,
            )
            for r in victims:
                if count <= limit and size <= budget:
                    break
                count, size = count - 1, size - r.nbytes
                self._drop(r)
                self.metrics.pack_evictions.inc()
                log.info("pack evicted", extra={"event": "pack_evicted", "pack": r.ref, "bytes": r.nbytes})
            if count > limit or size > budget:
                log.warning(
                    "resident packs over budget",
                    extra={
                        "event": "packs_over_budget",
                        "resident": count,
                        "resident_bytes": size,
                        "max_resident": limit,
                        "max_resident_bytes": budget,
                    },
                )
        self.metrics.packs_resident.set(count)
        self.metrics.packs_resident_bytes.set(size)

    def _drop(self, r: Resident) -> None:
        """r leaves memory (eviction or a freed unload): its request routes, gate series and live record go."""
        r.state = "freed"
        self._resident.pop((r.name, r.version), None)
        for route in [k for k, v in self._request_routes.items() if v is r]:
            del self._request_routes[route]
        self.metrics.drop_gate(r.name, r.version)
        if not any(x.name == r.name for x in self._resident.values()):
            self.metrics.drop_pack(r.name)
        if self.ab is not None and (r.name, r.version) not in self._disabled:
            self.ab.forget(r.name, r.version)

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
                r = self._resident.get((name, tag))
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
                if route not in self._routes and r.state == "resident":
                    self._request_routes.setdefault(route, r)
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
                            r.refcount += 1
                            r.last_used = time.monotonic()
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
        with self._lock:
            for p in pins:
                r = p.resident
                if r is None:
                    continue
                r.refcount -= 1
                if r.refcount == 0 and r.state == "unloading":
                    self._free(r)

    def _free(self, r: Resident) -> None:
        self._drop(r)
        self.metrics.packs_resident.set(len(self._resident))
        self.metrics.packs_resident_bytes.set(sum(x.nbytes for x in self._resident.values()))
        log.info("pack freed", extra={"event": "pack_freed", "pack": r.ref})

    # ------------------------------------------------------------ activation / hot swap
    def _load_ref(self, ref: str, by_request: bool = False, deadline: float | None = None) -> tuple[str, str, Resident]:

        try:
            name, version = self.source.resolve(ref)
        except PackNotFoundError as e:
            self.metrics.pack_loads.labels("not_found").inc()
            raise PackNotFound("", f"unknown pack {ref!r}: {e}") from None
        except PackError as e:
            raise from_pack_error(e, "", f"pack {ref!r}: {e}") from None
        return name, version, self._load(name, version, by_request, deadline)

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
            self._unloaded.discard(key)
            if (self._disabled.pop(key, None) is not None or r.state == "disabled") and self.ab is not None:
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
                r = self._routes.get(f"{name}@{tag}") or self._resident.get((name, tag))
            if r is None:
                r = self._request_routes.get(name if tag is None else f"{name}@{tag}")
            if r is None:
                raise PackNotFound("ref", f"pack {ref!r} is not resident")
            for route in [k for k, v in self._routes.items() if v is r]:
                del self._routes[route]
            for route in [k for k, v in self._request_routes.items() if v is r]:
                del self._request_routes[route]
            for hist in self._history.values():
                hist[:] = [h for h in hist if h is not r]
            r.state = "unloading"
            self._unloaded.add((r.name, r.version))
            freed = r.refcount == 0
            if freed:
                self._free(r)
            self._publish_routes()
        log.info("pack unloaded", extra={"event": "pack_unloaded", "pack": r.ref, "freed": freed})
        return r.name, r.version, freed

    def disable(self, name: str, version: str, reason: str) -> list[str]:
        """Take a version out of service: its routes fall back to their previous target or to base."""
        with self._lock:
            self._disabled[(name, version)] = reason
            r = self._resident.get((name, version))
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
        for route in [k for k, v in self._request_routes.items() if v is r]:
            del self._request_routes[route]
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
            r = self._resident.get((name, version))
            if r is None or r.state in ("freed", "unloading"):
                return []
            moved = self._fall_back(r)
            r.state = "unloading"
            if r.refcount == 0:
                self._free(r)
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
        for route, r in self._routes.items():
            if r is None:
                continue
            alias = route.split("@", 1)[1] if "@" in route else ""
            labels.append((r.name, r.version, alias))
        self.metrics.set_active_packs(labels)

    # ------------------------------------------------------------ store notifications
    def on_store_event(self, event) -> None:
        """An alias moved in the store: hot-swap the routes that follow it (gate first); a version deleted
        from the store is withdrawn (`withdraw`); any change under a name drops its request routes.

        The alias is re-read at handling time (events can be stale when admin
        calls move it too); a refused version leaves the routes as they are.
        """
        kind = getattr(event, "kind", "alias_moved")
        name, alias = getattr(event, "name", None), getattr(event, "alias", None)
        if name:  # anything changed under this name: request routes ask the store again
            with self._lock:
                for route in [k for k in self._request_routes if k == name or k.startswith(name + "@")]:
                    del self._request_routes[route]
        if kind == "version_deleted" and name and getattr(event, "version", None):
            self.withdraw(name, event.version)
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
                disabled = self._disabled.get((name, version))
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
                r = self._load(name, version)
            except ServeError as e:
                log.warning(
                    "alias move refused",
                    extra={"event": "alias_move_refused", "route": route, "version": version, "reason": e.message},
                )
                return
            with self._lock:
                self._unloaded.discard((name, version))  # the store's operator moved the alias to it
            self._set_routes([name, route], r)

    def subscribe(self, interval_s: float) -> None:
        sub = getattr(self.source, "subscribe", None)
        if sub is not None:
            self._subscription = sub(self.on_store_event, interval_s)

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
            return dict(self._routes)

    def residents(self) -> list[Resident]:
        with self._lock:
            return list(self._resident.values())

    def refused(self) -> dict[str, str]:
        with self._lock:
            return {k: v[1] for k, v in self._refused.items()}

    def state_of(self, r: Resident) -> str:
        with self._lock:
            if r.state != "resident":
                return r.state
            return "active" if any(v is r for v in self._routes.values()) else "resident"

    def routes_of(self, r: Resident) -> list[str]:
        with self._lock:
            return sorted(k for k, v in self._routes.items() if v is r)


def sticky_fraction(*parts: str) -> float:
    h = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64
