"""The smaller holes, each against a live server: a huge prompt is refused
before tokenizing, a pack reference with a trailing newline is malformed, the
demo admin token only on loopback, undecodable bytes are INVALID_ARGUMENT and
counted, a shutdown cut says so, reflection answers v1 and v1alpha."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from sensepack_proto import ADMIN_SERVICE, GENERATION_SERVICE, admin_pb, admin_pb_grpc, pb, pb_grpc
from sensepack_testing.serve import (
    auth,
    channel,
    demo_served,
    make_config,
    metric,
    parse_metrics,
    running_server,
    scrape,
)
from serve.client import build_generate_request

C = grpc.StatusCode


SERVER_CONFIG = {"limits.max_prompt_tokens": 64}


def test_huge_prompt_refused_before_tokenizing(server):
    stub = pb_grpc.GenerationServiceStub(channel(server))
    with pytest.raises(grpc.RpcError) as ei:
        stub.Generate(build_generate_request("a" * 1_000_000, base_only=True))
    assert ei.value.code() == C.INVALID_ARGUMENT and ei.value.details().startswith("text:")
    # the character bound (64 tokens x 128 characters), not the token count: nothing was tokenized
    assert "more than 64 tokens" in ei.value.details() and "at most 128 characters" in ei.value.details()
    req = pb.ScoreRequest(prefix_text="The capital is")
    req.continuations.add(text="b" * 100_000)
    with pytest.raises(grpc.RpcError) as ei:
        stub.Score(req)
    assert ei.value.code() == C.INVALID_ARGUMENT and ei.value.details().startswith("continuations[0].text:")
    # a long text that fits is still served
    assert stub.Generate(build_generate_request("a " * 30, base_only=True, max_new_tokens=1)).generated_token_count


@pytest.mark.parametrize("ref", ["capitals@prod\n", "capitals\n", "capitals@prod\r", " capitals"])
def test_pack_reference_with_trailing_newline_is_malformed(server, ref):
    stub = pb_grpc.GenerationServiceStub(channel(server))
    with pytest.raises(grpc.RpcError) as ei:
        stub.Generate(build_generate_request("Hello", packs=[ref], max_new_tokens=1))
    assert ei.value.code() == C.INVALID_ARGUMENT and ei.value.details().startswith("packs[0].ref: malformed")
    adm = admin_pb_grpc.PackAdminStub(channel(server))
    with pytest.raises(grpc.RpcError) as ei:
        adm.LoadPack(admin_pb.LoadPackRequest(ref=ref), metadata=auth())
    assert ei.value.code() == C.INVALID_ARGUMENT and ei.value.details().startswith("ref: malformed")


def test_demo_admin_token_only_on_loopback(tmp_path, monkeypatch):
    from serve.server import SensepackServer

    monkeypatch.delenv("SENSEPACK_ADMIN_TOKEN", raising=False)
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.org"):
        with pytest.raises(ValueError) as ei:
            SensepackServer(
                make_config(tmp_path, **{"admin.token": "demo-admin-token", "server.host": host}), served=demo_served()
            )
        assert str(ei.value).startswith("admin.token:") and repr(host) in str(ei.value)
    with running_server(
        tmp_path, demo_served(), **{"admin.token": "demo-admin-token", "server.host": "127.0.0.1"}
    ) as srv:
        adm = admin_pb_grpc.PackAdminStub(channel(srv))
        assert adm.ListPacks(admin_pb.ListPacksRequest(), metadata=auth("demo-admin-token")) is not None


def test_undecodable_request_is_invalid_argument_and_counted(server):
    ch = channel(server)
    raw = pb.GenerateRequest(text="Hello x").SerializeToString().replace(b"x", b"\xff")
    before = metric(
        parse_metrics(scrape(server)), "sensepack_requests_total", method="Generate", status="INVALID_ARGUMENT"
    )
    for method in ("Generate", "GenerateStream"):
        call = getattr(ch, "unary_unary" if method == "Generate" else "unary_stream")(
            f"/{GENERATION_SERVICE}/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as ei:
            out = call(raw, timeout=30)
            list(out) if method == "GenerateStream" else out
        assert ei.value.code() == C.INVALID_ARGUMENT and ei.value.details().startswith("request: not a valid")
    after = metric(
        parse_metrics(scrape(server)), "sensepack_requests_total", method="Generate", status="INVALID_ARGUMENT"
    )
    assert after - before == 1
    adm = ch.unary_unary(
        f"/{ADMIN_SERVICE}/LoadPack", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    bad_admin = admin_pb.LoadPackRequest(ref="capitals@x").SerializeToString().replace(b"@x", b"@\xff")
    with pytest.raises(grpc.RpcError) as ei:
        adm(bad_admin, metadata=auth(), timeout=30)
    assert ei.value.code() == C.INVALID_ARGUMENT


def test_reflection_v1_and_v1alpha(server):
    ch = channel(server)
    for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
        call = ch.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (resp,) = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
        names = {s.name for s in resp.list_services_response.service}
        assert {GENERATION_SERVICE, ADMIN_SERVICE, "grpc.reflection.v1.ServerReflection"} <= names


def test_request_cut_at_shutdown_gets_unavailable(tmp_path):
    from serve.server import SensepackServer

    srv = SensepackServer(make_config(tmp_path, **{"limits.max_new_tokens": 2000}), served=demo_served()).start()
    stub = pb_grpc.GenerationServiceStub(channel(srv))
    call = stub.GenerateStream(build_generate_request("Hello", base_only=True, max_new_tokens=2000, ignore_eos=True))
    next(call)
    next(call)
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 0.0})
    stopper.start()
    with pytest.raises(grpc.RpcError) as ei:
        for _ in call:
            pass
    stopper.join()
    assert ei.value.code() == C.UNAVAILABLE
    assert ei.value.details().startswith("server shutting down: the request was cut after")
