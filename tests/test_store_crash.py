"""A publisher SIGKILLed at random points leaves the old state or the complete new version, never a partial one.

Each round forks a real publisher process (from a forkserver that has already imported torch and the store,
so a round costs milliseconds rather than an interpreter start), lets it publish packs and flip ``prod`` in a
loop, and kills it with SIGKILL after a random delay (every other round: a short random delay after the
child entered ``publish()``, so that many kills land inside it even on a slow, busy host). After every kill
the test checks, from the outside: the visible versions are exactly seeds 0..m-1 (publishes happen in order,
none half-visible), each loads with full validation and holds exactly the content its seed generates, and
``prod`` is either unchanged or points at the last or next-to-last seed the killed child published (flipped,
or not yet flipped).
"""

from __future__ import annotations

import multiprocessing
import random
import time

from edits_store import PackStore
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
        staging = list((spec.root / ".staging").glob("*"))
        alias_temps = list((spec.root / "demo" / "_aliases").glob(".*.tmp"))  # killed mid alias flip
        return [str(p) for p in staging + alias_temps]
    committed = set(store.backend.list_versions("demo"))
    found = store.backend.fs.find(store.backend._path("demo"))
    return [p for p in found if "/_aliases/" not in p and p.rstrip("/").split("/")[-2] not in committed]


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
    assert sorted(store.gc(older_than_s=0)) == sorted(partial)
    assert leftovers(store_spec, store) == []
    assert check_state(store, known) == (visible + 1, visible)
    print(f"{store_spec.kind}: {KILLS} kills (phase at kill: {killed_in}), {visible} versions completed, "
          f"{len(partial)} partial leftovers, all invisible")

