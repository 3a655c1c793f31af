"""Nothing a client can push grows without bound: metrics labels come from a
closed set; the counters alerts use exist at 0 from the start."""

from __future__ import annotations

import grpc
import pytest

from sensepack_proto import ADMIN_SERVICE
from sensepack_testing.serve import (
    channel,
    demo_served,
    parse_metrics,
    running_server,
    scrape,
)


def _call(ch, method: str, token: str | None = None):
    call = ch.unary_unary(
        f"/{ADMIN_SERVICE}/{method}", request_serializer=lambda x: x, response_deserializer=lambda x: x
    )
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
    key = 'sensepack_requests_total{frontend="grpc",method="unknown",status="UNAUTHENTICATED"}'
    assert after[key] - before[key] == 1000


def test_alert_counters_exist_at_zero(server):
    samples = parse_metrics(scrape(server))
    for name in ("sensepack_ab_breaches_total", "sensepack_pack_auto_disables_total", "sensepack_ab_samples_total"):
        assert samples[f'{name}{{pack="capitals"}}'] == 0.0


def test_admission_by_token_budget(tmp_path):
    """limits.max_batched_tokens: a request holds prompt + max_new_tokens; the third of three 1506-token
    requests waits under a 3100-token budget until one leaves; one that can never fit is refused."""
    from sensepack_proto import pb, pb_grpc
    from sensepack_testing.serve import wait_until
    from serve.client import build_generate_request

    with running_server(
        tmp_path,
        demo_served(),
        **{"limits.max_batched_tokens": 3100, "limits.max_running": 4, "limits.max_new_tokens": 2000},
    ) as srv:
        stub = pb_grpc.GenerationServiceStub(channel(srv))
        prompt = list(range(300, 306))  # 6 tokens + 1500 new
        calls = [
            stub.GenerateStream(build_generate_request(prompt, base_only=True, max_new_tokens=1500, ignore_eos=True))
            for _ in range(3)
        ]
        for c in calls:
            next(c)  # accepted (the head is sent at submission)
        assert wait_until(lambda: srv.engine.running == 2 and srv.engine.waiting == 1)
        calls[0].cancel()  # its tokens free up: the third joins
        assert wait_until(lambda: srv.engine.running == 2 and srv.engine.waiting == 0)
        for c in calls[1:]:
            c.cancel()
        assert wait_until(lambda: srv.engine.running == 0)
        # a Score in progress holds its tokens too: with 2000 of them reserved, a 1506-token request waits
        srv.engine.begin_score(2000)
        late = stub.GenerateStream(build_generate_request(prompt, base_only=True, max_new_tokens=1500, ignore_eos=True))
        next(late)
        assert wait_until(lambda: srv.engine.waiting == 1) and srv.engine.running == 0
        srv.engine.end_score(2000)
        assert wait_until(lambda: srv.engine.running == 1 and srv.engine.waiting == 0)
        late.cancel()
        assert wait_until(lambda: srv.engine.running == 0)
    with running_server(tmp_path, demo_served(), **{"limits.max_batched_tokens": 100}) as srv:
        stub = pb_grpc.GenerationServiceStub(channel(srv))
        with pytest.raises(grpc.RpcError) as ei:  # 6 + 95 tokens can never fit a 100-token budget
            stub.Generate(build_generate_request(prompt, base_only=True, max_new_tokens=95))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ei.value.details().startswith("stopping.max_new_tokens:") and "max_batched_tokens" in ei.value.details()
        assert stub.Generate(build_generate_request(prompt, base_only=True, max_new_tokens=94)).generated_token_count
        req = pb.ScoreRequest(prefix_token_ids=pb.TokenIds(ids=prompt))
        req.continuations.add(token_ids=pb.TokenIds(ids=list(range(95))))
        with pytest.raises(grpc.RpcError) as ei:
            stub.Score(req)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ei.value.details().startswith("continuations[0]:") and "max_batched_tokens" in ei.value.details()
