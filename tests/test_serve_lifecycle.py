"""Cancellation and deadlines free their slot and are counted; /metrics moves;
graceful shutdown drains running requests."""
from __future__ import annotations

import threading

import grpc
import pytest

from edits_store.store import open_store
from sensepack_proto import pb, pb_grpc
from serve.client import Client, build_generate_request
from serve.testing import (channel, demo_served, demo_variant, metric, parse_metrics, publish_edits, running_server,
                           scrape, wait_until)

C = grpc.StatusCode

REQUIRED = [
    "sensepack_requests_total", "sensepack_time_to_first_token_seconds_count",
    "sensepack_inter_token_latency_seconds_count", "sensepack_e2e_request_latency_seconds_count",
    "sensepack_queue_time_seconds_count", "sensepack_requests_running", "sensepack_requests_waiting",
    "sensepack_prompt_tokens_total", "sensepack_generation_tokens_total", "sensepack_backpack_step_seconds_count",
    "sensepack_exact_skip_steps_total", "sensepack_backpack_window_reprefills_total", "sensepack_pack_loads_total",
]
AFTER_PACK_TRAFFIC = ["sensepack_active_pack_info", "sensepack_requests_by_pack_total", "sensepack_gate_ball_ratio"]
MOVING = [
    "sensepack_requests_total", "sensepack_time_to_first_token_seconds_count",
    "sensepack_inter_token_latency_seconds_count", "sensepack_e2e_request_latency_seconds_count",
    "sensepack_queue_time_seconds_count", "sensepack_prompt_tokens_total", "sensepack_generation_tokens_total",
    "sensepack_backpack_step_seconds_count", "sensepack_exact_skip_steps_total",
    "sensepack_backpack_window_reprefills_total", "sensepack_requests_by_pack_total",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    served = demo_served()
    store_dir = tmp_path_factory.mktemp("store")
    store = open_store(str(store_dir))
    publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, alias="prod")
    with running_server(store_dir, served, **{"limits.max_new_tokens": 1500, "limits.max_prompt_tokens": 400}) as server:
        yield {"server": server, "stub": pb_grpc.GenerationServiceStub(channel(server)),
               "client": Client(f"127.0.0.1:{server.port}")}


def _long(packs=("capitals",), n=1500):
    return build_generate_request("The capital of Mauritius is", packs=list(packs), max_new_tokens=n, ignore_eos=True)


def _count(server, method, status):
    return metric(parse_metrics(scrape(server)), "sensepack_requests_total", method=method, status=status)


def test_cancel_stream_frees_slot_and_is_counted(env):
    server, stub = env["server"], env["stub"]
    before = _count(server, "GenerateStream", "CANCELLED")
    call = stub.GenerateStream(_long())
    next(call), next(call)                     # admitted, first token generated
    assert server.engine.running == 1
    call.cancel()
    assert wait_until(lambda: server.engine.running == 0 and server.engine.waiting == 0)
    assert wait_until(lambda: _count(server, "GenerateStream", "CANCELLED") == before + 1)
    assert all(r.refcount == 0 for r in server.packs.residents())


def test_cancel_unary_frees_slot_and_is_counted(env):
    server, stub = env["server"], env["stub"]
    before = _count(server, "Generate", "CANCELLED")
    fut = stub.Generate.future(_long())
    assert wait_until(lambda: server.engine.running == 1)
    fut.cancel()
    assert wait_until(lambda: server.engine.running == 0)
    assert wait_until(lambda: _count(server, "Generate", "CANCELLED") == before + 1)


@pytest.mark.parametrize("streaming", [False, True])
def test_deadline_exceeded_frees_slot_and_is_counted(env, streaming):
    server, stub = env["server"], env["stub"]
    method = "GenerateStream" if streaming else "Generate"
    before = _count(server, method, "DEADLINE_EXCEEDED")
    with pytest.raises(grpc.RpcError) as ei:
        if streaming:
            list(stub.GenerateStream(_long(), timeout=1.0))
        else:
            stub.Generate(_long(), timeout=1.0)
    assert ei.value.code() == C.DEADLINE_EXCEEDED
    assert wait_until(lambda: server.engine.running == 0)
    assert wait_until(lambda: _count(server, method, "DEADLINE_EXCEEDED") == before + 1)
    assert all(r.refcount == 0 for r in server.packs.residents())


def test_metrics_exist_and_move(env):
    server, c = env["server"], env["client"]
    before = parse_metrics(scrape(server))
    names_before = {k.partition("{")[0] for k in before}
    for name in REQUIRED:
        assert name in names_before, name
    # traffic: base (exact skip), pack, a prompt past the Backpack's window (demo: 128 positions)
    c.generate("The weather today is", base_only=True, max_new_tokens=4)
    c.generate("The capital of Mauritius is", packs=["capitals"], max_new_tokens=4)
    long_prompt = "Mauritius is an island. " * 30          # > 128 tokens, then 40 more: the window slides
    r = c.generate(long_prompt, packs=["capitals"], max_new_tokens=40, ignore_eos=True)
    assert r.generated_token_count == 40
    list(c.stream("Hello there", base_only=True, max_new_tokens=3))
    c.score("The capital of Mauritius is", [" Port Louis"], packs=["capitals"])
    after = parse_metrics(scrape(server))
    names_after = {k.partition("{")[0] for k in after}
    for name in REQUIRED + AFTER_PACK_TRAFFIC:
        assert name in names_after, name
    for name in MOVING:
        assert metric(after, name) > metric(before, name), name
    assert metric(after, "sensepack_requests_total", method="Generate", status="OK") >= \
        metric(before, "sensepack_requests_total", method="Generate", status="OK") + 3
    assert metric(after, "sensepack_requests_by_pack_total", pack="capitals", arm="pack") > \
        metric(before, "sensepack_requests_by_pack_total", pack="capitals", arm="pack")
    assert metric(after, "sensepack_active_pack_info", pack="capitals", alias="") == 1
    assert metric(after, "sensepack_pack_loads_total", result="ok") >= 1
    assert metric(after, "sensepack_requests_running") == 0


def test_graceful_shutdown_drains(tmp_path):
    served = demo_served()
    with running_server(tmp_path, served) as server:
        stub = pb_grpc.GenerationServiceStub(channel(server))
        n = 150
        call = stub.GenerateStream(build_generate_request("Hello", base_only=True, max_new_tokens=n, ignore_eos=True))
        msgs = [next(call), next(call)]
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 60.0})
        stopper.start()
        assert wait_until(lambda: not server.engine.scheduler.accepting)
        assert server.engine.running == 1                    # still generating while draining
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        status = health_pb2_grpc.HealthStub(channel(server)).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as ei:
            stub.Generate(build_generate_request("Hi", base_only=True, max_new_tokens=2))
        assert ei.value.code() == C.UNAVAILABLE, (ei.value.code(), ei.value.details())
        msgs += list(call)                    # the running request finishes normally
        stopper.join()
        assert msgs[-1].stop_reason == pb.MAX_TOKENS and msgs[-1].generated_token_count == n
