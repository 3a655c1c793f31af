"""A publisher SIGKILLed at random points leaves the old state or the complete new version, never a partial one.

Each round forks a real publisher process (from a forkserver that has already imported torch and the store,
so a round costs milliseconds rather than an interpreter start), lets it publish packs and flip ``prod`` in a
loop, and kills it with SIGKILL after a random delay (every other round: a short random delay after the
child entered ``publish()``, so that many kills land inside it even on a slow, busy host). After every kill
the test checks, from the outside: the visible versions are exactly seeds 0..m-1 (publishes happen in order,
none half-visible), each loads with full validation and holds exactly the content its seed generates, and
``prod`` is either unchanged or points at the last or next-to-last seed the killed child published (flipped,
or not yet flipped).

The second test runs concurrent writers together: a publisher, a gc loop (cutoff 0) and an alias mover, all
SIGKILLed at random points each round; afterwards every visible version loads with its exact content and every
alias resolves to a loadable version.
"""

from __future__ import annotations

import multiprocessing
import random
import time

from edits_store import ConcurrentUpdateError, PackNotFoundError, PackStore
from edits_store.backends.object_store import FsspecBackend
from edits_store.format import VERSION_RE
from tests.test_store_fixtures import (  # noqa: F401  (fixture)
    StoreSpec,
    assert_content,
    make_pack,
    store_spec,
)

N_ROWS, D = 2048, 256  # 2 MiB of deltas: writes take long enough for kills to land inside them
KILLS = 24
MAX_DELAY_S = {"local": 0.3, "s3": 0.4}

_ctx = multiprocessing.get_context("forkserver")
_ctx.set_forkserver_preload(["torch", "edits_store.store", "s3fs", "tests.test_store_fixtures"])


IDLE, PUBLISHING, FLIPPING = 0, 1, 2


def publisher_loop(spec: StoreSpec, start: int, ready, phase) -> None:
    """Child process: publish seeds start, start+1, ... and point prod at each, until killed.

    ``phase`` (shared memory) tells the parent what the child was doing when it was killed.
    """
    import torch

    torch.set_num_threads(1)
    store = spec.open()
    store.backend.version_committed("demo", "0" * 32)  # connect before signalling ready
    ready.set()
    for seed in range(start, start + 1000):
        pack = make_pack(seed, n=N_ROWS, d=D)
        phase.value = PUBLISHING
        version = store.publish(pack)
        phase.value = FLIPPING
        store.set_alias("demo", "prod", version)
        phase.value = IDLE


def leftovers(spec: StoreSpec, store: PackStore) -> list[str]:
    """Invisible remains of killed writes: staging dirs (local) or objects of uncommitted versions (S3)."""
    if spec.kind == "local":
        assert spec.root is not None, "a local StoreSpec carries its root"
        staging = list((spec.root / ".staging").glob("*"))
        alias_temps = list((spec.root / "demo" / "_aliases").glob(".*.tmp"))  # killed mid alias flip
        return [str(p) for p in staging + alias_temps]
    backend = store.backend
    assert isinstance(backend, FsspecBackend), "an s3 store runs on the fsspec backend"
    committed = set(backend.list_versions("demo"))
    found = backend.fs.find(backend._path("demo"))
    folders = [p.rstrip("/").split("/")[-2] for p in found]
    return [p for p, f in zip(found, folders, strict=True) if VERSION_RE.match(f) and f not in committed]


def check_state(store: PackStore, known: dict[str, int]) -> tuple[int, int | None]:
    """Validate what a reader sees; returns (number of visible seeds, seed prod points to)."""
    seeds = []
    for version in store.backend.list_versions("demo"):
        if version not in known:
            pack = store.load(f"demo@{version}")  # full validation: hashes, tensors, ids
            seed = pack.manifest.training["seed"]
            assert_content(pack, seed=seed, n=N_ROWS, d=D)
            known[version] = seed
        seeds.append(known[version])
    m = len(seeds)
    assert sorted(seeds) == list(range(m)), f"visible seeds must be a prefix 0..{m - 1}, got {sorted(seeds)}"
    prod = store.aliases("demo").get("prod")
    if prod is None:
        return m, None
    prod_seed = known[prod]
    assert_content(store.load("demo@prod"), seed=prod_seed, n=N_ROWS, d=D)
    return m, prod_seed


def test_sigkilled_publisher_never_leaves_a_partial_version(store_spec):
    rng = random.Random(1234)
    store = store_spec.open()
    known: dict[str, int] = {}
    visible, prod_seed = 0, None
    killed_in = {IDLE: 0, PUBLISHING: 0, FLIPPING: 0}
    for round_no in range(KILLS):
        ready, phase = _ctx.Event(), _ctx.Value("i", IDLE)
        proc = _ctx.Process(target=publisher_loop, args=(store_spec, visible, ready, phase), daemon=True)
        proc.start()
        assert ready.wait(60), "publisher did not start"
        if round_no % 2:  # every other round: aim inside publish() (however slow a busy host makes the child)
            deadline = time.monotonic() + 30
            while phase.value != PUBLISHING and time.monotonic() < deadline:
                time.sleep(0.0005)
            proc.join(rng.uniform(0.0, 0.03))
        else:  # otherwise: any point of the loop
            proc.join(rng.uniform(0.0, MAX_DELAY_S[store_spec.kind]))
        assert proc.is_alive(), "the publisher is meant to be killed, not to finish or crash"
        proc.kill()  # SIGKILL
        proc.join()
        assert proc.exitcode == -9
        killed_in[phase.value] += 1
        new_visible, new_prod = check_state(store, known)
        assert new_visible >= visible
        # prod is unchanged, or points at the last or next-to-last seed this child published
        allowed = {prod_seed} | {s for s in (new_visible - 1, new_visible - 2) if s >= visible}
        assert new_prod in allowed, f"prod at seed {new_prod}, expected one of {allowed}"
        visible, prod_seed = new_visible, new_prod
    assert visible > 0, "some publishes completed between kills"
    assert killed_in[PUBLISHING] >= KILLS // 4, f"kills must land inside publish() (phases at kill: {killed_in})"

    # The store keeps working after the crashes, and gc clears the invisible leftovers.
    final = make_pack(visible, n=N_ROWS, d=D)
    store.publish(final)
    store.set_alias("demo", "prod", final.version)
    partial = leftovers(store_spec, store)
    if store_spec.kind == "s3":
        store.backend.lease_ttl_s = 0.0  # the killed publishers' leases are stale: their orphans may go
    assert set(partial) <= set(store.gc(older_than_s=0))
    assert leftovers(store_spec, store) == []
    assert check_state(store, known) == (visible + 1, visible)
    print(
        f"{store_spec.kind}: {KILLS} kills (phase at kill: {killed_in}), {visible} versions completed, "
        f"{len(partial)} partial leftovers, all invisible"
    )


# --------------------------------------------------------------------------- publishers + gc + alias movers

ROUNDS = 10
SMALL_ROWS = 512  # smaller packs: three writers share two cores


def _open_for_child(spec: StoreSpec) -> PackStore:
    import torch

    torch.set_num_threads(1)
    store = spec.open()
    if spec.kind == "s3":
        assert isinstance(store.backend, FsspecBackend), "an s3 store runs on the fsspec backend"
        store.backend.fence_ttl_s = 5.0  # a killed gc's fence must not stall the next round for a minute
    store.backend.version_committed("demo", "0" * 32)  # connect before signalling ready
    return store


def tolerant_publisher(spec: StoreSpec, start: int, ready) -> None:
    store = _open_for_child(spec)
    ready.set()
    seed = start
    while True:
        try:
            store.publish(make_pack(seed, n=SMALL_ROWS, d=D))
            seed += 1
        except ConcurrentUpdateError:
            continue  # gc took the staging folder, or a fence held too long: retry the same content


def gc_loop(spec: StoreSpec, ready) -> None:
    store = _open_for_child(spec)
    ready.set()
    while True:
        store.gc(older_than_s=0.2 if spec.kind == "local" else 0.0)


def alias_mover(spec: StoreSpec, seed: int, ready) -> None:
    store = _open_for_child(spec)
    rng = random.Random(seed)
    ready.set()
    while True:
        versions = sorted(store.backend.list_versions("demo"))
        if not versions:
            continue
        try:
            store.set_alias("demo", rng.choice(["prod", "canary"]), rng.choice(versions))
        except (ConcurrentUpdateError, PackNotFoundError):
            continue


def test_sigkilled_publishers_gc_and_alias_movers_leave_only_loadable_state(store_spec):
    rng = random.Random(99)
    store = store_spec.open()
    if store_spec.kind == "s3":
        store.backend.fence_ttl_s = 5.0
    known: dict[str, int] = {}
    visible = 0
    for round_no in range(ROUNDS):
        procs = []
        for target, args in (
            (tolerant_publisher, (store_spec, visible)),
            (gc_loop, (store_spec,)),
            (alias_mover, (store_spec, round_no)),
        ):
            ready = _ctx.Event()
            proc = _ctx.Process(target=target, args=(*args, ready), daemon=True)
            proc.start()
            procs.append((proc, ready))
        for _, ready in procs:
            assert ready.wait(60), "a writer did not start"
        time.sleep(rng.uniform(0.05, 0.6))
        rng.shuffle(procs)
        for proc, _ in procs:
            assert proc.is_alive(), "writers are meant to be killed, not to crash"
            proc.kill()
            proc.join()
            assert proc.exitcode == -9
        seeds = []
        for version in store.backend.list_versions("demo"):
            if version not in known:
                pack = store.load(f"demo@{version}")
                assert_content(pack, seed=pack.manifest.training["seed"], n=SMALL_ROWS, d=D)
                known[version] = pack.manifest.training["seed"]
            seeds.append(known[version])
        assert sorted(seeds) == list(range(len(seeds))), f"visible seeds {sorted(seeds)}"
        visible = len(seeds)
        for alias, version in store.aliases("demo").items():
            assert version in known, f"alias {alias} points at {version}, which is not a visible version"
            assert store.load(f"demo@{alias}").version == version
    assert visible > 0
    if store_spec.kind == "s3":
        store.backend.lease_ttl_s = store.backend.fence_ttl_s = 0.0
    store.gc(older_than_s=0)
    assert leftovers(store_spec, store) == []
    print(
        f"{store_spec.kind}: {ROUNDS} rounds, {visible} versions, aliases {store.aliases('demo')}, "
        f"{len(store.history('demo'))} alias moves logged"
    )
