"""Tenants on a real server, both front-ends: a tenant's key names, lists, scores and loads only packs under its
prefixes; another tenant's pack answers exactly as a pack that does not exist; per-tenant limits."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import grpc
import pytest

from edits_store.store import open_store
from sensepack_common.errors import ConfigError
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
from serve.config import load_config
from serve.errors import QueueFull
from serve.server import SensepackServer
from serve.tenants import Tenant

PROMPT = "We flew to Mauritius"
C = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = demo_served()
    path = tmp_path_factory.mktemp("store")
    store = open_store(str(path))
    for name, target in (("team-a-caps", " Paris"), ("team-a-more", " Lima"), ("team-b-caps", " Rome")):
        publish_edits(store, served, name, demo_variant(served, target), beta=1.0, alias="prod")
    with running_server(
        path,
        served,
        **{
            "http.enabled": True,
            "http.port": 0,
            "http.chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
            "packs.load_on_request": True,
            "packs.preload": ["team-a-caps@prod", "team-b-caps@prod"],
            "store.subscribe": False,
            "api.keys": ["open-key"],
            "api.tenants": [
                {"name": "a", "keys": ["key-a"], "packs": ["team-a-"], "max_concurrent_requests": 2},
                {"name": "b", "keys": ["key-b", "key-b2"], "packs": ["team-b-"]},
            ],
        },
    ) as srv:
        yield srv


def _grpc_error(server, key, call):
    with pytest.raises(grpc.RpcError) as ei:
        call(Client(f"127.0.0.1:{server.port}", api_key=key))
    return ei.value.code(), ei.value.details()


def _http(server, path, key, body=None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_tenant_uses_its_own_packs_on_both_front_ends(server):
    a = Client(f"127.0.0.1:{server.port}", api_key="key-a")
    out = a.generate(PROMPT, packs=["team-a-caps"], max_new_tokens=2)
    assert [(p.name, p.arm) for p in out.packs] == [("team-a-caps", "pack")]
    out = a.generate(PROMPT, packs=["team-a-more@prod"], max_new_tokens=2)  # loaded on request: its own prefix
    assert [(p.name, p.arm) for p in out.packs] == [("team-a-more", "pack")]
    assert a.score("We flew to", [" Paris"], packs=["team-a-caps"]).continuations
    code, body = _http(server, "/v1/completions", "key-a", {"model": "team-a-caps", "prompt": PROMPT, "max_tokens": 2})
    assert code == 200 and body["usage"]["completion_tokens"] == 2
    # an open key sees every pack
    out = Client(f"127.0.0.1:{server.port}", api_key="open-key").generate(
        PROMPT, packs=["team-b-caps"], max_new_tokens=1
    )
    assert out.packs[0].arm == "pack"


@pytest.mark.parametrize("key", ["key-a", "key-b"])
def test_another_tenants_pack_is_indistinguishable_from_a_missing_one(server, key):
    """Every RPC and route that takes packs: the foreign pack (resident, routed, in the store) and a pack that
    exists nowhere under the same foreign prefix give the same status and the same words."""
    other = "team-b-" if key == "key-a" else "team-a-"
    foreign, missing = f"{other}caps", f"{other}nope"

    def same(make):
        got = [make(ref) for ref in (foreign, missing)]
        assert got[0][0] == got[1][0]
        assert got[0][1].replace(foreign, "X") == got[1][1].replace(missing, "X")
        return got[0]

    calls = {
        "Generate": lambda ref: _grpc_error(server, key, lambda c: c.generate(PROMPT, packs=[ref], max_new_tokens=1)),
        "GenerateStream": lambda ref: _grpc_error(server, key, lambda c: list(c.stream(PROMPT, packs=[ref]))),
        "Score": lambda ref: _grpc_error(server, key, lambda c: c.score("We flew to", [" Rome"], packs=[ref])),
        "alias": lambda ref: _grpc_error(
            server, key, lambda c: c.generate(PROMPT, packs=[f"{ref}@prod"], max_new_tokens=1)
        ),
    }
    for name, make in calls.items():
        code, details = same(make)
        assert code == C.NOT_FOUND, name
        assert details.startswith("packs[0].ref: pack "), (name, details)
    for route, body in (
        ("/v1/completions", lambda ref: {"model": ref, "prompt": PROMPT, "max_tokens": 1}),
        ("/v1/chat/completions", lambda ref: {"model": ref, "messages": [{"role": "user", "content": "hi"}]}),
        (
            "/v1/completions",
            lambda ref: {"model": server.served.large_name, "packs": [ref], "prompt": PROMPT, "max_tokens": 1},
        ),
    ):
        code, err = same(lambda ref, route=route, body=body: _http_error(server, route, key, body(ref)))
        assert code == 404, (route, err)
        assert other not in err.replace(foreign, "").replace(missing, ""), err  # lists none of their packs
    code, err = same(lambda ref: _http_error(server, f"/v1/models/{ref}", key))
    assert code == 404


def _http_error(server, path, key, body=None):
    code, out = _http(server, path, key, body)
    return code, out["error"]["message"]


def test_a_tenant_lists_only_its_own_packs(server):
    def ids(key):
        code, body = _http(server, "/v1/models", key)
        assert code == 200
        return {m["id"] for m in body["data"]} - {server.served.large_name}

    a, b = ids("key-a"), ids("key-b2")
    assert {"team-a-caps", "team-a-caps@prod"} <= a and all(m.startswith("team-a-") for m in a), a
    assert {"team-b-caps", "team-b-caps@prod"} <= b and all(m.startswith("team-b-") for m in b), b
    assert ids("open-key") == a | b


def test_a_tenants_concurrency_limit_holds_only_it(server):
    a = Client(f"127.0.0.1:{server.port}", api_key="key-a")
    streams = [a.stream(PROMPT, packs=["team-a-caps"], max_new_tokens=150, ignore_eos=True) for _ in range(2)]
    heads = [next(s) for s in streams]  # both admitted: the tenant's two slots are taken
    assert all(h.packs for h in heads)
    before = parse_metrics(scrape(server))
    code, details = _grpc_error(server, "key-a", lambda c: c.generate(PROMPT, max_new_tokens=1))
    assert code == C.RESOURCE_EXHAUSTED and "tenant 'a'" in details and "max_concurrent_requests=2" in details
    code, err = _http_error(server, "/v1/completions", "key-a", {"model": "team-a-caps", "prompt": PROMPT})
    assert code == 429 and "tenant 'a'" in err
    # the other tenant and open keys are not held
    assert Client(f"127.0.0.1:{server.port}", api_key="key-b").generate(PROMPT, max_new_tokens=1).generated_token_count
    after = parse_metrics(scrape(server))
    assert (
        metric(after, "sensepack_tenant_limited_total", tenant="a", limit="requests")
        - metric(before, "sensepack_tenant_limited_total", tenant="a", limit="requests")
        == 2
    )
    assert metric(after, "sensepack_tenant_requests_running", tenant="a") == 2
    for s in streams:
        list(s)
    assert a.generate(PROMPT, max_new_tokens=1).generated_token_count == 1  # slots freed
    s = parse_metrics(scrape(server))
    assert metric(s, "sensepack_tenant_requests_running", tenant="a") == 0
    assert metric(s, "sensepack_tenant_requests_total", tenant="b", frontend="grpc") >= 1


def test_cold_loads_per_tenant_are_bounded():
    t = Tenant("a", ("team-a-",), max_cold_loads=2)
    done = threading.Event()
    with t.cold_load("packs[0].ref"), t.cold_load("packs[0].ref"):
        with pytest.raises(QueueFull) as ei, t.cold_load("packs[1].ref"):
            done.set()
        assert str(ei.value).startswith("packs[1].ref: tenant 'a': 2 pack loads in flight")
    assert not done.is_set()
    with t.cold_load("packs[0].ref"):
        assert t.loading == 1


@pytest.mark.parametrize(
    "tenants,key",
    [
        ([{"name": "a", "keys": ["k"], "packs": [""]}], "api.tenants.0.packs"),
        ([{"name": "a", "keys": ["k"], "packs": []}], "api.tenants.0.packs"),
        ([{"name": "a", "packs": ["x-"]}, {"name": "a", "packs": ["y-"]}], "tenants[1].name"),
        ([{"name": "bad name", "packs": ["x-"]}], "api.tenants.0.name"),
    ],
)
def test_tenant_config_errors_name_the_key(tenants, key):
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"api.tenants": tenants})
    assert key in str(ei.value)


def test_a_key_shared_by_two_tenants_is_refused_at_start(tmp_path):
    cfg = load_config(
        None,
        {
            "store.uri": str(tmp_path),
            "api.tenants": [
                {"name": "a", "keys": ["k"], "packs": ["a-"]},
                {"name": "b", "keys": ["k"], "packs": ["b-"]},
            ],
        },
    )
    with pytest.raises(ValueError, match=r"api.tenants\[1\].keys: a key of tenant 'b' is also one of tenant 'a'"):
        SensepackServer(cfg, served=demo_served())


def test_tenants_through_the_admin_api(server):
    admin = Client(f"127.0.0.1:{server.port}", token="test-admin-token")
    listed = {t.name: t for t in admin.list_tenants().tenants}
    assert set(listed) == {"a", "b"}
    assert (list(listed["b"].packs), listed["b"].keys, listed["b"].source) == (["team-b-"], 2, "config")
    assert "key-b" not in str(admin.list_tenants())  # keys are never returned
    info = admin.set_tenant("c", ["team-a-more"], ["key-c"], max_concurrent_requests=3)
    assert (info.name, list(info.packs), info.keys, info.source, info.max_cold_loads) == (
        "c",
        ["team-a-more"],
        1,
        "admin",
        1,
    )
    c = Client(f"127.0.0.1:{server.port}", api_key="key-c")
    assert c.generate(PROMPT, packs=["team-a-more"], max_new_tokens=1).packs[0].arm == "pack"
    code, details = _grpc_error(server, "key-c", lambda x: x.generate(PROMPT, packs=["team-a-caps"], max_new_tokens=1))
    assert code == C.NOT_FOUND and details == "packs[0].ref: pack 'team-a-caps' not found"
    for kwargs, field in (
        ({"name": "d", "packs": ["x-"], "keys": ["key-a"]}, "keys: a key of tenant 'd' is also one of tenant 'a'"),
        ({"name": "d", "packs": ["x-"], "keys": ["open-key"]}, "keys: a key of tenant 'd' is also one of api.keys"),
        ({"name": "d", "packs": [""], "keys": ["k"]}, "packs: "),
        ({"name": "d", "packs": ["x-"], "keys": []}, "keys: "),
        ({"name": "bad name", "packs": ["x-"], "keys": ["k"]}, "name: "),
        ({"name": "d", "packs": ["x-"], "keys": ["k"], "max_concurrent_requests": 0}, "max_concurrent_requests: "),
    ):
        with pytest.raises(grpc.RpcError) as ei:
            admin.set_tenant(**kwargs)
        assert ei.value.code() == C.INVALID_ARGUMENT and ei.value.details().startswith(field), ei.value.details()
    assert admin.remove_tenant("c").removed and not admin.remove_tenant("c").removed
    code, _ = _grpc_error(server, "key-c", lambda x: x.generate(PROMPT, max_new_tokens=1))
    assert code == C.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as ei:
        Client(f"127.0.0.1:{server.port}").list_tenants()  # the admin token, not an API key
    assert ei.value.code() == C.UNAUTHENTICATED
