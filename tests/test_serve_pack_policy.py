"""Packs change only through the admin API or the store's aliases: no token ->
no load, no revival, no re-routing; UnloadPack holds; the gate runs once per
(version, target model, G) and never past a request's deadline."""

from __future__ import annotations

import time

import grpc
import pytest

from edits_store.store import StoreEvent, open_store
from sensepack_proto import admin_pb, admin_pb_grpc
from sensepack_testing.serve import (
    auth,
    channel,
    demo_served,
    demo_variant,
    metric,
    parse_metrics,
    publish_edits,
    running_server,
    scrape,
    wait_until,
)
from serve.client import Client
from serve.errors import DeadlineExceeded
from serve.params import PackRequest

C = grpc.StatusCode
PROMPT = "We flew to Mauritius"


def _store(tmp_path, n_versions=1):
    served = demo_served()
    store = open_store(str(tmp_path))
    targets = [" Paris", " Rome", " Tokyo", " Berlin", " Madrid"]
    versions = [
        publish_edits(
            store, served, "capitals", demo_variant(served, targets[i]), beta=1.0, alias="prod" if i == 0 else None
        )
        for i in range(n_versions)
    ]
    return store, versions


def _capitals(server):
    return [r for r in server.packs.residents() if r.name == "capitals"]


def test_requests_load_no_pack_by_default(tmp_path):
    _, (v,) = _store(tmp_path)
    with running_server(tmp_path, demo_served(), **{"packs.load_on_request": False}) as server:
        c = Client(f"127.0.0.1:{server.port}", token="test-admin-token")
        before = parse_metrics(scrape(server))
        for ref in ("capitals", "capitals@prod", f"capitals@{v}"):
            with pytest.raises(grpc.RpcError) as ei:
                c.generate(PROMPT, packs=[ref], max_new_tokens=2)
            assert ei.value.code() == C.NOT_FOUND and ei.value.details().startswith("packs[0].ref:")
            assert "packs.load_on_request" in ei.value.details()
        assert _capitals(server) == [] and not [k for k in server.packs.routes() if k.startswith("capitals")]
        after = parse_metrics(scrape(server))
        for name in ("sensepack_pack_loads_total", "sensepack_gate_runs_total"):
            assert metric(after, name) == metric(before, name)
        c.load_pack("capitals@prod")  # the admin API does load it
        assert c.generate(PROMPT, packs=["capitals"], max_new_tokens=2).packs[0].version == v


def test_no_request_revives_a_disabled_version(tmp_path):
    store, (_good, planted, other) = _store(tmp_path, 3)
    store.set_alias("capitals", "canary", planted)
    with running_server(
        tmp_path,
        demo_served(),
        **{"packs.preload": ["capitals@prod"], "packs.max_resident": 2, "store.subscribe": False},
    ) as server:
        c = Client(f"127.0.0.1:{server.port}", token="test-admin-token")
        server.packs.activate(f"capitals@{planted}", activate=False)
        r = next(x for x in server.packs.residents() if x.version == planted)
        server.monitor.record(r, 10.0, 20.0, 5)  # a live record that must survive
        server.packs.disable("capitals", planted, "live ball breach (test)")
        routes = {k: (v.version if v else None) for k, v in server.packs.routes().items()}
        for _ in range(2):  # the second round reloads it after eviction (max_resident 2)
            for ref in (f"capitals@{planted}", "capitals@canary"):
                out = c.generate(PROMPT, packs=[ref], max_new_tokens=2)
                assert out.packs[0].arm == "base" and out.packs[0].version == ""
            c.generate(PROMPT, packs=["capitals"], max_new_tokens=2)
            c.generate(PROMPT, packs=[f"capitals@{other}"], max_new_tokens=2)  # evicts the disabled one
            assert planted not in [x.version for x in server.packs.residents()]
        # the store alias names the disabled version: its notification does not bring it back either
        server.packs.on_store_event(StoreEvent("alias_moved", "capitals", "canary", planted, None))
        assert {k: (v.version if v else None) for k, v in server.packs.routes().items()} == routes
        assert all(x.state == "disabled" for x in server.packs.residents() if x.version == planted)
        (rep,) = [p for p in c.ab_report("capitals").packs if p.version == planted]
        assert rep.samples == 1
        # an admin LoadPack re-enables it, with a fresh live record
        c.load_pack(f"capitals@{planted}", activate=False)
        assert c.generate(PROMPT, packs=[f"capitals@{planted}"], max_new_tokens=2).packs[0].arm == "pack"
        assert not [p for p in c.ab_report("capitals").packs if p.samples]


def test_alias_notification_after_auto_disable_keeps_the_fallback(tmp_path):
    """The race behind the flaky live A/B test: the store subscription delivers the alias move of an admin
    SetAlias after the live monitor disabled that version; the route must stay on the fallback."""
    _, (good, planted) = _store(tmp_path, 2)
    with running_server(
        tmp_path, demo_served(), **{"packs.preload": ["capitals@prod"], "store.subscribe": False}
    ) as server:
        c = Client(f"127.0.0.1:{server.port}", token="test-admin-token")
        c.set_alias("capitals", "prod", planted)
        server.packs.disable("capitals", planted, "live ball breach (test)")
        assert server.packs.routes()["capitals@prod"].version == good
        server.packs.on_store_event(StoreEvent("alias_moved", "capitals", "prod", planted, good))
        assert server.packs.routes()["capitals@prod"].version == good
        assert server.packs.routes()["capitals"].version == good


def test_the_subscription_watches_only_served_names_and_a_late_watch_catches_up(tmp_path):
    """The store subscription lists only the names this server routes or holds (a store of thousands costs
    what its served names cost); a name it starts watching after its routes were resolved has them looked up
    again: an alias moved in that gap is followed once the watch starts."""
    store, (v1, v2) = _store(tmp_path, 2)
    publish_edits(store, demo_served(), "elsewhere", demo_variant(demo_served(), " Lima"), beta=1.0, alias="prod")
    with running_server(
        tmp_path, demo_served(), **{"packs.preload": ["capitals@prod"], "store.subscribe": False}
    ) as server:
        assert server.packs.watched_names() == {"capitals"}  # "elsewhere" is in the store, not served
        c = Client(f"127.0.0.1:{server.port}", token="test-admin-token")
        c.generate(PROMPT, packs=["elsewhere"], max_new_tokens=2)  # a request route: watched from now on
        assert server.packs.watched_names() == {"capitals", "elsewhere"}
        store.set_alias("capitals", "prod", v2)  # the gap: moved before the subscription looked
        assert server.packs.routes()["capitals@prod"].version == v1
        server.packs.on_store_event(StoreEvent("watch_started", "capitals"))
        assert server.packs.routes()["capitals@prod"].version == v2
        assert c.generate(PROMPT, packs=["capitals@prod"], max_new_tokens=2).packs[0].version == v2


def test_unload_holds(tmp_path):
    _, (v,) = _store(tmp_path)
    with running_server(tmp_path, demo_served(), **{"packs.preload": ["capitals@prod"]}) as server:
        c = Client(f"127.0.0.1:{server.port}", token="test-admin-token")
        assert c.unload_pack("capitals").freed
        for ref in ("capitals", "capitals@prod", f"capitals@{v}"):
            with pytest.raises(grpc.RpcError) as ei:
                c.generate(PROMPT, packs=[ref], max_new_tokens=2)
            assert ei.value.code() == C.NOT_FOUND and ei.value.details().startswith("packs[0].ref:")
            assert "unloaded by an operator" in ei.value.details()
        assert _capitals(server) == []
        c.load_pack("capitals@prod")
        assert c.generate(PROMPT, packs=["capitals@prod"], max_new_tokens=2).packs[0].version == v


def test_version_cycling_gates_each_version_once(tmp_path):
    _, versions = _store(tmp_path, 4)
    with running_server(tmp_path, demo_served(), **{"packs.max_resident": 2}) as server:
        c = Client(f"127.0.0.1:{server.port}")
        samples = parse_metrics(scrape(server))
        gates0 = metric(samples, "sensepack_gate_runs_total")
        loads0 = metric(samples, "sensepack_pack_loads_total", result="ok")
        for i in range(24):
            v = versions[i % 4]
            assert c.generate(PROMPT, packs=[f"capitals@{v}"], max_new_tokens=1).packs[0].version == v
        samples = parse_metrics(scrape(server))
        # never resident when named again (the two most recent stay): 24 loads, 4 gate runs
        assert metric(samples, "sensepack_gate_runs_total") - gates0 == 4
        assert metric(samples, "sensepack_pack_loads_total", result="ok") - loads0 == 24
        assert len(_capitals(server)) <= 2


def test_gate_in_a_request_stops_at_its_deadline(tmp_path):
    _, (v,) = _store(tmp_path)
    with running_server(tmp_path, demo_served()) as server:
        pr = PackRequest(f"capitals@{v}", "capitals", v, None, "packs[0]")
        gates0 = metric(parse_metrics(scrape(server)), "sensepack_gate_runs_total")
        with pytest.raises(DeadlineExceeded) as ei:
            server.packs.admit([pr], deadline=time.monotonic() - 1.0)
        assert str(ei.value).startswith("packs[0].ref:")
        assert _capitals(server) == [] and server.packs.refused() == {}
        assert metric(parse_metrics(scrape(server)), "sensepack_gate_runs_total") == gates0
        adm = admin_pb_grpc.PackAdminStub(channel(server))  # without a deadline it loads
        r = adm.LoadPack(admin_pb.LoadPackRequest(ref=f"capitals@{v}", activate=False), metadata=auth())
        assert r.gate.passed and metric(parse_metrics(scrape(server)), "sensepack_gate_runs_total") == gates0 + 1


def test_request_load_without_deadline_is_bounded(tmp_path):
    """A request with no deadline of its own: the load and gate it triggers stop at packs.request_load_timeout_s."""
    _, (v,) = _store(tmp_path)
    with running_server(tmp_path, demo_served(), **{"packs.request_load_timeout_s": 1e-9}) as server:
        c = Client(f"127.0.0.1:{server.port}", token="test-admin-token")
        with pytest.raises(grpc.RpcError) as ei:
            c.generate(PROMPT, packs=[f"capitals@{v}"], max_new_tokens=1, timeout=None)
        assert ei.value.code() == C.DEADLINE_EXCEEDED and ei.value.details().startswith("packs[0].ref:")
        assert _capitals(server) == []
        c.load_pack(f"capitals@{v}", activate=False)  # the admin path has no such bound
        assert c.generate(PROMPT, packs=[f"capitals@{v}"], max_new_tokens=1).packs[0].version == v


def test_ab_gauges_per_version_only_while_resident(tmp_path):
    """The live A/B gauges carry `version`; a version's series go when it leaves memory (unload or
    eviction past packs.max_resident), so cycling versions leaves the series count bounded."""
    _, versions = _store(tmp_path, 4)
    with running_server(tmp_path, demo_served(), **{"packs.max_resident": 2, "store.subscribe": False}) as server:
        c = Client(f"127.0.0.1:{server.port}", token="test-admin-token")

        def series(name="sensepack_ab_ball_ratio"):  # the capitals pack's (the server also preloads the demo pack)
            s = parse_metrics(scrape(server))
            return sorted(k for k in s if k.startswith(name + '{pack="capitals"'))

        for v in versions:
            c.load_pack(f"capitals@{v}", activate=False)
            r = next(x for x in server.packs.residents() if x.version == v)
            server.monitor.record(r, 10.0, 10.5, 5)
            server.monitor.record(r, 12.0, 12.4, 5)
            resident = {x.version for x in _capitals(server)}
            assert len(resident) <= 2
            got = series()
            assert got == sorted(f'sensepack_ab_ball_ratio{{pack="capitals",version="{x}"}}' for x in resident)
            gated = sorted(f'sensepack_gate_ball_ratio{{pack="capitals",version="{x}"}}' for x in resident)
            assert series("sensepack_gate_ball_ratio") == gated  # the gate's series follow the same rule
            samples = parse_metrics(scrape(server))
            assert metric(samples, "sensepack_ab_ball_ratio_ci_lower", pack="capitals", version=v) > 0
        assert c.unload_pack(f"capitals@{versions[-1]}").freed
        assert versions[-1] not in "".join(series())
        assert versions[-1] not in "".join(series("sensepack_gate_ball_ratio"))


def test_a_version_deleted_from_the_store_is_withdrawn(tmp_path):
    """The store deletes the routed version: new requests fall back to the previous one, `name@version` is
    NOT_FOUND, and a request already running on it finishes on it (the subscription delivers the event)."""
    store, (v1, v2) = _store(tmp_path, 2)
    with running_server(
        tmp_path,
        demo_served(),
        **{"packs.preload": ["capitals@prod"], "store.poll_interval_s": 0.05, "packs.load_on_request": False},
    ) as server:
        c = Client(f"127.0.0.1:{server.port}", token="test-admin-token")
        c.load_pack(f"capitals@{v2}")  # route "capitals" -> v2, its previous target v1
        assert c.generate(PROMPT, packs=["capitals"], max_new_tokens=1).packs[0].version == v2
        stream = c.stream(PROMPT, packs=[f"capitals@{v2}"], max_new_tokens=150, ignore_eos=True)
        assert next(stream).packs[0].version == v2  # pinned
        store.delete_version("capitals", v2)
        assert wait_until(lambda: server.packs.routes()["capitals"].version == v1, timeout=10)
        assert c.generate(PROMPT, packs=["capitals"], max_new_tokens=1).packs[0].version == v1
        with pytest.raises(grpc.RpcError) as ei:
            c.generate(PROMPT, packs=[f"capitals@{v2}"], max_new_tokens=1)
        assert ei.value.code() == C.NOT_FOUND
        assert list(stream)[-1].generated_token_count == 150  # the running request finished on v2
        assert wait_until(lambda: v2 not in {r.version for r in _capitals(server)})
