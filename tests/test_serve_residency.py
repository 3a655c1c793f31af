"""Residency on a real server: packs.max_resident and packs.max_resident_bytes bound the versions in memory
however many packs requests name; eviction is LRU among unpinned versions no admin route holds; a cold pack
that many requests wait for loads (and is gated) once."""

from __future__ import annotations

import re
import threading

import pytest

from edits_store.store import open_store
from sensepack_testing.serve import (
    demo_served,
    demo_variant,
    metric,
    parse_metrics,
    publish_edits,
    running_server,
    scrape,
)
from serve.client import Client

PROMPT = "We flew to Mauritius"
TARGETS = [" Paris", " Rome", " Tokyo", " Berlin", " Madrid", " Lima", " Oslo", " Cairo"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    served = demo_served()
    path = tmp_path_factory.mktemp("store")
    store = open_store(str(path))
    for i, t in enumerate(TARGETS):
        publish_edits(store, served, f"pack{i}", demo_variant(served, t), beta=1.0)
    publish_edits(store, served, "admin", demo_variant(served, " Dublin"), beta=1.0, alias="prod")
    return path


def _resident(server):
    return {r.name for r in server.packs.residents()}


def _pack_bytes(server):
    return sum(r.nbytes for r in server.packs.residents())


def test_requests_naming_many_packs_stay_within_the_count(store_dir):
    """Each request loads a pack by name; the server keeps at most max_resident versions (the admin-routed
    one among them, never evicted) instead of one per name ever named."""
    with running_server(
        store_dir, demo_served(), **{"packs.max_resident": 3, "packs.preload": ["admin@prod"], "store.subscribe": False}
    ) as server:
        c = Client(f"127.0.0.1:{server.port}")
        for rnd in range(2):
            for i in range(len(TARGETS)):
                out = c.generate(PROMPT, packs=[f"pack{i}"], max_new_tokens=2)
                assert [(p.name, p.arm) for p in out.packs] == [(f"pack{i}", "pack")]
                names = _resident(server)
                assert len(names) <= 3 and "admin" in names and f"pack{i}" in names, (rnd, i, names)
        s = parse_metrics(scrape(server))
        assert metric(s, "sensepack_pack_evictions_total") >= 2 * len(TARGETS) - 2
        assert metric(s, "sensepack_packs_resident") == len(server.packs.residents()) <= 3
        assert metric(s, "sensepack_packs_resident_bytes") == _pack_bytes(server)
        assert metric(s, "sensepack_pack_load_seconds_count") == metric(s, "sensepack_pack_loads_total", result="ok")
        # per-pack series follow the resident packs, not every pack ever named
        for family in ("sensepack_requests_by_pack_total", "sensepack_ab_samples_total", "sensepack_ab_breaches_total"):
            labelled = {re.search(r'pack="([^"]*)"', k).group(1) for k in s if k.startswith(family + "{")}
            assert labelled <= _resident(server), (family, labelled)


def test_the_byte_budget_evicts_least_recently_used_and_never_a_pinned_pack(store_dir):
    served = demo_served()
    with running_server(store_dir, served, **{"packs.max_resident": 100, "store.subscribe": False}) as server:
        c = Client(f"127.0.0.1:{server.port}")
        c.generate(PROMPT, packs=["pack0"], max_new_tokens=1)
        one = _pack_bytes(server)
    budget = int(2.5 * one)  # two of these packs fit
    with running_server(store_dir, served, **{"packs.max_resident_bytes": budget, "store.subscribe": False}) as server:
        c = Client(f"127.0.0.1:{server.port}")
        stream = c.stream(PROMPT, packs=["pack0"], max_new_tokens=120, ignore_eos=True, tokens=True)
        first = next(stream)  # the header: pack0 is admitted and pinned from here until the stream ends
        assert [(p.name, p.arm) for p in first.packs] == [("pack0", "pack")]
        for i in range(1, 6):
            c.generate(PROMPT, packs=[f"pack{i}"], max_new_tokens=1)
            names = _resident(server)
            assert "pack0" in names and f"pack{i}" in names, names
            assert _pack_bytes(server) <= budget + one  # at most the pinned one over
        assert "pack1" not in _resident(server)  # least recently used went first
        rest = list(stream)
        assert rest[-1].generated_token_count == 120
        c.generate(PROMPT, packs=["pack6"], max_new_tokens=1)  # pack0 is unpinned now: evictable
        assert _pack_bytes(server) <= budget and "pack6" in _resident(server)
        s = parse_metrics(scrape(server))
        assert metric(s, "sensepack_packs_resident_bytes") == _pack_bytes(server) <= budget


def test_a_cold_pack_many_requests_wait_for_loads_once(store_dir):
    with running_server(store_dir, demo_served(), **{"store.subscribe": False}) as server:
        c = Client(f"127.0.0.1:{server.port}")
        before = parse_metrics(scrape(server))
        outs: list = [None] * 8

        def run(i: int) -> None:
            outs[i] = c.generate(PROMPT, packs=["pack7"], max_new_tokens=2)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(outs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {(o.packs[0].name, o.packs[0].arm) for o in outs} == {("pack7", "pack")}
        after = parse_metrics(scrape(server))
        for name, labels in (
            ("sensepack_pack_loads_total", {"result": "ok"}),
            ("sensepack_gate_runs_total", {}),
            ("sensepack_pack_load_seconds_count", {}),
        ):
            assert metric(after, name, **labels) - metric(before, name, **labels) == 1, name
