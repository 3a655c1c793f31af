"""Nothing a client can push grows without bound: metrics labels come from a
closed set; the counters alerts use exist at 0 from the start."""
from __future__ import annotations

import grpc
import pytest

from edits_store.store import open_store
from proto import ADMIN_SERVICE
from serve.testing import channel, demo_served, demo_variant, parse_metrics, publish_edits, running_server, scrape


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("store")
    publish_edits(open_store(str(store_dir)), demo_served(), "capitals", demo_variant(demo_served(), " Paris"),
                  beta=1.0, alias="prod")
    with running_server(store_dir, demo_served(), **{"packs.preload": ["capitals@prod"]}) as srv:
        yield srv


def _call(ch, method: str, token: str | None = None):
    call = ch.unary_unary(f"/{ADMIN_SERVICE}/{method}", request_serializer=lambda x: x,
                          response_deserializer=lambda x: x)
    md = [("authorization", f"Bearer {token}")] if token else None
    with pytest.raises(grpc.RpcError) as ei:
        call(b"", metadata=md, timeout=30)
    return ei.value.code()


def test_made_up_method_names_add_no_series(server):
    ch = channel(server)
    assert _call(ch, "MadeUp-0") == grpc.StatusCode.UNAUTHENTICATED
    assert _call(ch, "MadeUp-1", token="wrong") == grpc.StatusCode.PERMISSION_DENIED
    before = parse_metrics(scrape(server))
    for i in range(2000):
        _call(ch, f"MadeUp-{i}-{'x' * (i % 50)}", token="wrong" if i % 2 else None)
    after = parse_metrics(scrape(server))
    assert set(after) == set(before)
    assert not [k for k in after if "MadeUp" in k]
    key = 'sensepack_requests_total{method="unknown",status="UNAUTHENTICATED"}'
    assert after[key] - before[key] == 1000


def test_alert_counters_exist_at_zero(server):
    samples = parse_metrics(scrape(server))
    for name in ("sensepack_ab_breaches_total", "sensepack_pack_auto_disables_total", "sensepack_ab_samples_total"):
        assert samples[f'{name}{{pack="capitals"}}'] == 0.0
