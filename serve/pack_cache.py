"""Resident pack versions: each loaded once, validated and gated, pinned by the requests that use it, and
evicted within a budget (the cache half of the pack manager; serve.packs holds the routes).

* A **resident** version is loaded from the store, validated against the served Backpack / tokenizer /
  large model (edits_store `Expectations`), and has passed the activation gate (serve.abtest). Loads are
  single-flight: however many requests wait for a cold version, it is read and gated once. Refused versions
  are remembered with the reason. Gate results are cached per (version, target model, G, β, ε): eviction
  and reloading do not re-gate.
* Every admitted request **pins** the versions it resolved (a reference count); an unloaded version is
  freed only when its count drops to 0.
* **Residency** is bounded by count and bytes (``packs.max_resident``, ``packs.max_resident_bytes``): past
  either, versions no request pins and the manager does not hold (`held`: admin-routed) are evicted, least
  recently used first. Pinned and held versions may keep the cache over budget.
"""

from __future__ import annotations

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
from serve.errors import DeadlineExceeded, PackNotFound, PackRefused, ServeError

log = logging.getLogger("sensepack.packs")


def served_edits(contents: PackContents, target_fingerprint: str) -> tuple[SenseEdits, CalibrationEntry]:
    """A loaded pack as the engine applies it to one large model: its edits (own tensors, not the loaded
    pack's) and the calibration entry (β, ε) for that model (MissingBetaError when it has none)."""
    entry = contents.manifest.beta_for(target_fingerprint)
    edits = SenseEdits(contents.token_ids.clone(), contents.sense_ids.clone(), contents.deltas.clone())
    return edits, entry


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
        return self.edits.nbytes

    def pack_ref(self, beta: float | None = None) -> PackRef:
        return PackRef(self.name, self.version, self.edits, self.calibrated_beta if beta is None else beta)


class StoreAPI(Protocol):
    """Where versions come from (edits_store.PackStore, or any store with this surface)."""

    def load(self, ref: str, expect): ...
    def resolve(self, ref: str) -> tuple[str, str]: ...
    def set_alias(self, name: str, alias: str, version: str) -> None: ...


class GateFn(Protocol):
    """The activation gate (serve.abtest.Gate): measures a version's ball ratio."""

    fingerprint: str | None

    def __call__(self, r: Resident, deadline: float | None = None) -> GateResult: ...


class ResidentTable(dict):
    """(name, version) -> Resident, owned by one PackManager (mutated under its lock). Built before the
    manager so that an engine can read resident edits from it (serve.vllm.resolver.PackManagerSource)
    without depending on the manager."""

    def residents(self) -> list[Resident]:
        return list(self.values())


def with_trusted_keys(expect, keys):
    """packs.trusted_keys set: only packs signed by one of these ed25519 keys load (edits_store SignatureError,
    whose message names the failed check: signature_present, signature_key, signature)."""
    if not keys:
        return expect
    import dataclasses

    return dataclasses.replace(expect, trusted_keys=tuple(public_raw(k) for k in keys))


class PackCache:
    """The resident versions of one server. `source`: the pack store; `gate(resident) -> GateResult`;
    `held()`: ids of the versions the owner keeps in memory whatever the budget (admin routes); `on_drop(r)`: called
    under the lock when r leaves memory; `forget(name, version)`: the live monitor forgets the version."""

    def __init__(
        self,
        source: StoreAPI,
        expectations,
        target_fingerprint: str,
        config,
        metrics,
        gate: GateFn | None = None,
        residents: ResidentTable | None = None,
        forget: Callable[[str, str], None] | None = None,
    ):
        self.source = source
        self.expect = with_trusted_keys(expectations, config.packs.trusted_keys)
        self.target_fingerprint = target_fingerprint
        self.cfg = config
        self.metrics = metrics
        self.gate = gate
        self.forget = forget
        self.held: Callable[[], set[int]] = set  # ids of the versions the owner keeps in memory
        self.on_drop: Callable[[Resident], None] = lambda r: None
        self.lock = threading.RLock()
        self.table: ResidentTable = residents if residents is not None else ResidentTable()
        self.disabled: dict[tuple[str, str], str] = {}  # version -> reason; survives eviction
        self.unloaded: set[tuple[str, str]] = set()  # UnloadPack'ed; requests may not reload them
        self._refused: dict[str, tuple[type[ServeError], str]] = {}
        self._loading: dict[tuple[str, str], Future] = {}
        self._gate_cache: dict[tuple, GateResult] = {}

    def get(self, name: str, version: str, by_request: bool = False, deadline: float | None = None) -> Resident:
        """Load + validate + gate one version (deduplicated); raises a ServeError.

        by_request: a request asked (load_on_request): an unloaded version stays unloaded, and the gate
        runs within `deadline` (time.monotonic()).
        """
        key = (name, version)
        with self.lock:
            if by_request and key in self.unloaded:
                raise PackNotFound(
                    "",
                    f"pack {name}@{version} was unloaded by an operator (PackAdmin.UnloadPack); "
                    "an admin LoadPack or SetAlias brings it back",
                )
            r = self.table.get(key)
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
            with self.lock:
                if key in self.disabled:  # a disabled version stays disabled after eviction and reload
                    r.state = "disabled"
                self.table[key] = r
                self.evict(keep=key)
            fut.set_result(r)
            return r
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self.lock:
                self._loading.pop(key, None)

    def _refuse(self, ref: str, message: str, result: str) -> PackRefused:
        with self.lock:
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
        with self.lock:
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
        with self.lock:
            self._gate_cache[key] = g
        return g

    def evict(self, keep: tuple[str, str] | None = None) -> None:
        """Stay within packs.max_resident versions and packs.max_resident_bytes: drop unpinned versions no admin
        route holds, least recently used first; never `keep` (just loaded for a request that has not pinned it
        yet). Pinned and admin-routed versions may hold the server over budget (bounded by the running requests
        and the operator)."""
        limit, budget = self.cfg.packs.max_resident, self.cfg.packs.max_resident_bytes
        count, size = len(self.table), sum(r.nbytes for r in self.table.values())
        if count > limit or size > budget:
            held = self.held()
            victims = sorted(
                (r for key, r in self.table.items() if r.refcount == 0 and key != keep and id(r) not in held),
                key=lambda r: r.last_used,
            )
            for r in victims:
                if count <= limit and size <= budget:
                    break
                count, size = count - 1, size - r.nbytes
                self.drop(r)
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

    def drop(self, r: Resident) -> None:
        """r leaves memory (eviction or a freed unload): what points at it (`on_drop`), its gate and per-pack
        series and its live record go."""
        r.state = "freed"
        self.table.pop((r.name, r.version), None)
        self.on_drop(r)
        self.metrics.drop_gate(r.name, r.version)
        if not any(x.name == r.name for x in self.table.values()):
            self.metrics.drop_pack(r.name)
        if self.forget is not None and (r.name, r.version) not in self.disabled:
            self.forget(r.name, r.version)

    def free(self, r: Resident) -> None:
        """An unloaded version's last request ended: it leaves memory."""
        self.drop(r)
        self.metrics.packs_resident.set(len(self.table))
        self.metrics.packs_resident_bytes.set(sum(x.nbytes for x in self.table.values()))
        log.info("pack freed", extra={"event": "pack_freed", "pack": r.ref})

    def pin(self, r: Resident) -> None:
        """A request uses r until `unpin` (call under `lock`)."""
        r.refcount += 1
        r.last_used = time.monotonic()

    def unpin(self, r: Resident) -> None:
        with self.lock:
            r.refcount -= 1
            if r.refcount == 0 and r.state == "unloading":
                self.free(r)

    def residents(self) -> list[Resident]:
        with self.lock:
            return list(self.table.values())

    def refused(self) -> dict[str, str]:
        with self.lock:
            return {k: v[1] for k, v in self._refused.items()}
