"""The versioned store, run identically against the local directory and a real S3-compatible server."""

from __future__ import annotations

import os
import queue
import threading
import time

import pytest
import torch

from edits_store import (
    AliasError,
    Expectations,
    HashMismatchError,
    IncompatiblePackError,
    InvalidReferenceError,
    MissingBetaError,
    PackNotFoundError,
    RetentionError,
    StoreEvent,
    UnsafeFileError,
    open_store,
)
from edits_store.backends.object_store import FsspecBackend
from tests.test_store_fixtures import (  # noqa: F401  (fixtures)
    BACKPACK_FP,
    TARGET_FP,
    assert_content,
    make_pack,
    store,
    store_spec,
)


def version_dir_files(store_spec, name: str, version: str) -> dict[str, str]:
    """Raw paths of a stored version's files, for tampering; keys are file names."""
    if store_spec.kind == "local":
        base = store_spec.root / name / version
        return {p.name: str(p) for p in base.iterdir()}
    backend = store_spec.open().backend
    assert isinstance(backend, FsspecBackend)
    return {p.rsplit("/", 1)[-1]: p for p in backend.fs.find(backend._path(name, version))}


def raw_write(store_spec, path: str, data: bytes) -> None:
    if store_spec.kind == "local":
        with open(path, "wb") as f:
            f.write(data)
    else:
        store_spec.open().backend.fs.pipe_file(path, data)


def raw_read(store_spec, path: str) -> bytes:
    if store_spec.kind == "local":
        with open(path, "rb") as f:
            return f.read()
    return store_spec.open().backend.fs.cat_file(path)


# --------------------------------------------------------------------------- publish / load / resolve


def test_publish_then_load_round_trips_and_republish_is_a_noop(store):
    pack = make_pack(1)
    version = store.publish(pack)
    assert version == pack.version
    assert_content(store.load(f"demo@{version}"), seed=1)
    rebuilt = make_pack(1)  # same content, later created_at
    assert store.publish(rebuilt) == version
    assert [v.version for v in store.list_versions("demo")] == [version]
    assert store.load(f"demo@{version}").manifest.created_at == pack.manifest.created_at  # first publish kept
    assert store.list_packs() == ["demo"]


def test_resolve_prefers_prod_then_latest_and_understands_every_reference(store):
    v1 = store.publish(make_pack(1))
    time.sleep(0.02)
    v2 = store.publish(make_pack(2))
    assert store.resolve("demo") == ("demo", v2)  # no prod: latest published
    assert store.resolve("demo@latest") == ("demo", v2)
    store.set_alias("demo", "prod", v1)
    store.set_alias("demo", "canary", v2)
    assert store.resolve("demo") == ("demo", v1)
    assert store.resolve("demo@canary") == ("demo", v2)
    assert store.resolve(f"demo@{v2}") == ("demo", v2)
    assert store.aliases("demo") == {"canary": v2, "prod": v1}
    assert [(i.version, i.aliases) for i in store.list_versions("demo")] == [(v1, ("prod",)), (v2, ("canary",))]
    assert_content(store.load("demo"), seed=1)
    assert_content(store.load("demo@canary"), seed=2)


def test_unknown_and_malformed_references(store):
    store.publish(make_pack(1))
    with pytest.raises(PackNotFoundError):
        store.resolve("other")
    with pytest.raises(PackNotFoundError):
        store.resolve("demo@" + "0" * 32)
    with pytest.raises(PackNotFoundError) as info:
        store.resolve("demo@staging")
    assert info.value.check == "alias"
    for bad in ["", "de mo", "demo@", "a@b@c", "../etc"]:
        with pytest.raises(InvalidReferenceError):
            store.resolve(bad)


def test_alias_must_name_an_existing_version_and_a_valid_alias(store):
    version = store.publish(make_pack(1))
    with pytest.raises(PackNotFoundError):
        store.set_alias("demo", "prod", "f" * 32)
    for bad in ["latest", "a" * 32, "has space", "../x", "", "prod\n"]:
        with pytest.raises(AliasError):
            store.set_alias("demo", bad, version)
    assert store.aliases("demo") == {}


def test_load_checks_compatibility_against_the_served_model(store):
    store.publish(make_pack(1))
    assert_content(
        store.load("demo", Expectations(backpack_fingerprint=BACKPACK_FP, target_fingerprint=TARGET_FP)), seed=1
    )
    with pytest.raises(IncompatiblePackError):
        store.load("demo", Expectations(backpack_fingerprint="sha256:" + "1" * 64))
    with pytest.raises(MissingBetaError):
        store.load("demo", Expectations(target_fingerprint="sha256:" + "2" * 64))


def test_a_corrupted_stored_version_is_refused_by_load(store_spec, store):
    version = store.publish(make_pack(1))
    path = version_dir_files(store_spec, "demo", version)["senses.safetensors"]
    data = bytearray(raw_read(store_spec, path))
    data[-3] ^= 0x40
    raw_write(store_spec, path, bytes(data))
    with pytest.raises(HashMismatchError) as info:
        store.load("demo")
    assert info.value.pack == f"demo@{version}" and info.value.file == "senses.safetensors"


def test_a_version_without_its_manifest_is_invisible(store_spec, store):
    """What a publisher killed between the tensor file and the manifest leaves behind on S3."""
    good = store.publish(make_pack(1))
    orphan = make_pack(2)
    files = version_dir_files(store_spec, "demo", good)
    orphan_path = files["senses.safetensors"].replace(good, orphan.version)
    if store_spec.kind == "local":
        os.makedirs(os.path.dirname(orphan_path))
    raw_write(store_spec, orphan_path, b"partial tensor bytes")
    assert [v.version for v in store.list_versions("demo")] == [good]
    assert store.resolve("demo") == ("demo", good)
    with pytest.raises(PackNotFoundError):
        store.load(f"demo@{orphan.version}")
    with pytest.raises(PackNotFoundError):
        store.set_alias("demo", "prod", orphan.version)


def test_a_version_copied_under_the_wrong_name_is_refused(tmp_path):
    import shutil

    from edits_store import SchemaError

    store = open_store(tmp_path / "store")
    version = store.publish(make_pack(1))
    shutil.copytree(tmp_path / "store" / "demo" / version, tmp_path / "store" / "impostor" / version)
    with pytest.raises(SchemaError) as info:
        store.load(f"impostor@{version}")
    assert info.value.check == "location"


# --------------------------------------------------------------------------- delete / retention


def test_delete_with_retention(store):
    v1 = store.publish(make_pack(1))
    v2 = store.publish(make_pack(2))
    store.set_alias("demo", "prod", v1)
    with pytest.raises(RetentionError) as info:
        store.delete_version("demo", v1)
    assert "prod" in str(info.value)
    assert_content(store.load(f"demo@{v1}"), seed=1)  # refused delete changed nothing
    store.delete_version("demo", v2)
    assert [v.version for v in store.list_versions("demo")] == [v1]
    with pytest.raises(PackNotFoundError):
        store.load(f"demo@{v2}")
    with pytest.raises(PackNotFoundError):
        store.delete_version("demo", v2)
    store.delete_version("demo", v1, force=True)
    assert store.list_versions("demo") == []
    assert store.aliases("demo") == {}  # force drops the aliases that pointed there
    assert [(h["from"], h["to"]) for h in store.history("demo")] == [(None, v1), (v1, None)]  # and logs it
    with pytest.raises(PackNotFoundError):
        store.load("demo")


def test_republishing_a_deleted_version_brings_it_back(store):
    version = store.publish(make_pack(1))
    store.delete_version("demo", version)
    assert store.publish(make_pack(1)) == version
    assert_content(store.load("demo"), seed=1)


def test_loaded_pack_survives_deletion_of_its_version(store):
    """A request pinned to a loaded version keeps its tensors when the version is deleted."""
    version = store.publish(make_pack(1))
    in_use = store.load("demo")
    store.delete_version("demo", version)
    assert_content(in_use, seed=1)


def test_prune_keeps_newest_and_aliased(store):
    versions = []
    for seed in range(5):
        versions.append(store.publish(make_pack(seed)))
        time.sleep(0.02)
    store.set_alias("demo", "prod", versions[0])
    deleted = store.prune("demo", keep=2)
    assert sorted(deleted) == sorted(versions[1:3])
    assert [v.version for v in store.list_versions("demo")] == [versions[0], versions[3], versions[4]]


# --------------------------------------------------------------------------- concurrency


def test_concurrent_publishers_of_same_and_different_content(store_spec):
    """Threads, each with its own store handle, publish overlapping pack sets at once."""
    seeds_by_thread = [[0, 1, 2, 10 + t] for t in range(8 if store_spec.kind == "local" else 4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(seeds_by_thread))

    def publisher(seeds):
        try:
            s = store_spec.open()
            packs = [make_pack(seed, n=64, d=32) for seed in seeds]
            barrier.wait()
            for p in packs:
                assert s.publish(p) == p.version
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(seeds,)) for seeds in seeds_by_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = store_spec.open()
    expected = {make_pack(seed, n=64, d=32).version: seed for seed in {s for ss in seeds_by_thread for s in ss}}
    listed = {v.version for v in store.list_versions("demo")}
    assert listed == set(expected)
    for version, seed in expected.items():
        assert_content(store.load(f"demo@{version}"), seed=seed, n=64, d=32)


def test_readers_never_see_a_partial_version_while_alias_flips(store_spec):
    """Readers resolve+load demo@prod in a loop while a writer publishes new versions and flips prod."""
    store = store_spec.open()
    n, d = 256, 64
    seeds = list(range(6))
    versions = {}
    for seed in seeds[:2]:
        versions[store.publish(make_pack(seed, n=n, d=d))] = seed
    store.set_alias("demo", "prod", next(iter(versions)))
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def reader():
        s = store_spec.open()
        try:
            while not stop.is_set():
                pack = s.load("demo@prod")
                assert_content(pack, seed=pack.manifest.training["seed"], n=n, d=d)
                seen.append(pack.version)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3 if store_spec.kind == "local" else 2)]
    for r in readers:
        r.start()
    flips = 0
    try:
        for seed in seeds[2:]:  # new versions appear while being read
            versions[store.publish(make_pack(seed, n=n, d=d))] = seed
        for i in range(40 if store_spec.kind == "local" else 12):
            store.set_alias("demo", "prod", list(versions)[i % len(versions)])
            flips += 1
            time.sleep(0.005)
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert errors == []
    assert flips and len(seen) >= 3
    assert set(seen) <= set(versions)
    assert len(set(seen)) >= 2, "readers observed the flips"


# --------------------------------------------------------------------------- notifications


def collect(store, **kwargs):
    events: queue.Queue[StoreEvent] = queue.Queue()
    return store.subscribe(events.put, **kwargs), events


def next_event(events, timeout=15.0) -> StoreEvent:
    return events.get(timeout=timeout)


def test_subscribers_hear_versions_and_alias_moves(store):
    v1 = store.publish(make_pack(1))
    sub, events = collect(store, interval_s=0.05)
    try:
        v2 = store.publish(make_pack(2))
        assert next_event(events) == StoreEvent("version_published", "demo", version=v2)
        store.set_alias("demo", "prod", v1)
        assert next_event(events) == StoreEvent("alias_moved", "demo", alias="prod", version=v1, previous=None, seq=1)
        store.set_alias("demo", "prod", v2)
        assert next_event(events) == StoreEvent("alias_moved", "demo", alias="prod", version=v2, previous=v1, seq=2)
        store.remove_alias("demo", "prod")
        assert next_event(events) == StoreEvent("alias_removed", "demo", alias="prod", previous=v2)
        store.delete_version("demo", v1)
        assert next_event(events) == StoreEvent("version_deleted", "demo", version=v1)
        other = make_pack(3, name="other")
        store.publish(other)
        assert next_event(events) == StoreEvent("version_published", "other", version=other.version)
    finally:
        sub.close()
    store.publish(make_pack(4))
    time.sleep(0.2)
    assert events.empty(), "a closed subscription reports nothing"


def test_subscription_filtered_by_name_and_resilient_to_callback_errors(store):
    calls: list[StoreEvent] = []

    def flaky(event):
        calls.append(event)
        raise RuntimeError("subscriber bug")

    with store.subscribe(flaky, interval_s=0.05, names=["wanted"]) as sub:
        store.publish(make_pack(1, name="ignored"))
        first = make_pack(2, name="wanted")
        second = make_pack(3, name="wanted")
        store.publish(first)
        deadline = time.monotonic() + 15
        while len(calls) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        store.publish(second)
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert sub._thread.is_alive() is False
    assert [(e.name, e.version) for e in calls] == [("wanted", first.version), ("wanted", second.version)]


def test_scan_of_named_packs_is_the_full_scan_restricted_to_them(store):
    for i, name in enumerate(["a", "b", "c"]):
        v = store.publish(make_pack(i, name=name))
        store.set_alias(name, "prod", v)
    store.publish(make_pack(9, name="c"))
    full = store.backend.scan()
    assert set(full) == {"a", "b", "c"}
    # S3 lists by name only where that is cheaper than one whole listing: check both ways
    for share in (0.0, 1.0) if hasattr(store.backend, "per_name_scan_share") else (None,):
        if share is not None:
            store.backend.per_name_scan_share = share
        assert store.backend.scan(["c", "a", "missing", "not a name!"]) == {"a": full["a"], "c": full["c"]}
        assert store.backend.scan([]) == {}


def test_a_changing_set_of_watched_names(store):
    """names as a callable: a name joining the set starts from its state then (watch_started, no events for its
    existing versions or aliases), changes under it are heard from then on; a name leaving it is forgotten (no
    deletion events) and its changes go unheard."""
    watched = {"a"}
    store.publish(make_pack(1, name="a"))
    b1 = store.publish(make_pack(2, name="b"))
    store.set_alias("b", "prod", b1)
    sub, events = collect(store, interval_s=0.05, names=lambda: set(watched))
    try:
        store.publish(make_pack(3, name="b"))  # unwatched: unheard
        a2 = store.publish(make_pack(4, name="a"))
        assert next_event(events) == StoreEvent("version_published", "a", version=a2)
        watched.add("b")
        assert next_event(events) == StoreEvent("watch_started", "b")
        b3 = store.publish(make_pack(5, name="b"))
        assert next_event(events) == StoreEvent("version_published", "b", version=b3)
        store.set_alias("b", "prod", b3)
        assert next_event(events) == StoreEvent("alias_moved", "b", alias="prod", version=b3, previous=b1, seq=2)
        watched.discard("a")
        store.publish(make_pack(6, name="a"))  # no longer watched: unheard, and leaving made no events
        b4 = store.publish(make_pack(7, name="b"))
        assert next_event(events) == StoreEvent("version_published", "b", version=b4)
    finally:
        sub.close()
    assert events.empty()


# --------------------------------------------------------------------------- housekeeping


def test_gc_removes_only_old_invisible_leftovers(store_spec, store):
    good = store.publish(make_pack(1))
    if store_spec.kind == "local":
        old, fresh = store_spec.root / ".staging" / "old", store_spec.root / ".staging" / "fresh"
        for leftover in (old, fresh):
            leftover.mkdir(parents=True)
            (leftover / "senses.safetensors").write_bytes(b"x")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        assert store.gc(older_than_s=3600) == [str(old)]
        assert fresh.exists()
    else:
        backend = store.backend
        orphan = backend._path("demo", make_pack(2).version, "senses.safetensors")
        backend.fs.pipe_file(orphan, b"x")
        assert store.gc(older_than_s=3600) == []  # could be a publisher at work
        assert store.gc(older_than_s=0) == [orphan]
        assert not backend.fs.exists(orphan)
    assert_content(store.load(f"demo@{good}"), seed=1)


def test_open_store_urls(tmp_path):
    assert open_store(str(tmp_path / "a")).backend.root == str(tmp_path / "a")
    assert open_store(f"file://{tmp_path}/b").backend.root == str(tmp_path / "b")
    mem = open_store("memory://packs-test-" + str(os.getpid()))
    version = mem.publish(make_pack(1))
    assert mem.resolve("demo") == ("demo", version)
    assert_content(mem.load("demo"), seed=1)
    assert torch.equal(mem.load("demo").deltas, make_pack(1).deltas)


def test_a_loaded_pack_can_be_promoted_to_another_store_unchanged(store, tmp_path):
    """Copying staging → production re-serialises the loaded tensors; the content version must not change."""
    version = store.publish(make_pack(1))
    loaded = store.load("demo")
    other = open_store(tmp_path / "prod-store")
    assert other.publish(loaded) == version
    assert_content(other.load(f"demo@{version}"), seed=1)


def test_a_stray_uncommitted_version_directory_is_refused_never_moved_and_gc_removes_it(tmp_path):
    store = open_store(tmp_path / "store")
    pack = make_pack(1)
    stray = tmp_path / "store" / "demo" / pack.version
    stray.mkdir(parents=True)
    (stray / "senses.safetensors").write_bytes(b"garbage")
    assert store.list_versions("demo") == []
    with pytest.raises(UnsafeFileError) as err:  # publish never moves a folder it did not write
        store.publish(pack)
    assert err.value.check == "version_folder"
    assert (stray / "senses.safetensors").read_bytes() == b"garbage"
    assert store.gc() == [str(stray)]
    assert store.publish(pack) == pack.version
    assert_content(store.load("demo"), seed=1)


def test_read_pack_reads_a_version_folder_on_either_backend(store_spec, store):
    from edits_store import read_pack

    version = store.publish(make_pack(1))
    if store_spec.kind == "local":
        pack = read_pack(store_spec.root / "demo" / version)
    else:
        pack = read_pack(store.backend._path("demo", version), fs=store.backend.fs)
    assert pack.version == version
    assert_content(pack, seed=1)
