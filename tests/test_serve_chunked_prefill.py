"""Chunked prefill on the real server (loopback, demo models): 16 prompts of 1,536 tokens arrive beside a
running stream; the stream keeps getting tokens between the burst's chunks (counted by order of events, not
timed), and every burst answer equals the ensemble core's unchunked greedy decode."""

from __future__ import annotations

import threading

import grpc

from sensepack_proto import pb_grpc
from sensepack_testing.serve import demo_served, running_server
from serve.client import build_generate_request

PROMPT_LEN, BURST, CHUNK = 1536, 16, 256


def _burst(server, served) -> tuple[int, list[list[int]]]:
    """(stream tokens received while the burst was in flight, each burst request's output ids)."""
    stub = pb_grpc.GenerationServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    seen: list[str] = []  # the order of events: "s" a stream token, "b" a burst answer
    lock = threading.Lock()
    started = threading.Event()
    stream_req = build_generate_request(
        "The capital of Mauritius is", base_only=True, max_new_tokens=400, ignore_eos=True
    )
    call = stub.GenerateStream(stream_req)

    def follow() -> None:
        n = 0
        try:
            for m in call:
                if m.generated_token_count > n:
                    n = m.generated_token_count
                    with lock:
                        seen.append("s")
                    if n >= 3:
                        started.set()
        except grpc.RpcError:
            pass

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert started.wait(120)
    outs: list[list[int]] = [[] for _ in range(BURST)]

    def one(i: int) -> None:
        prompt = [(464 + 7 * i + k) % 50000 for k in range(PROMPT_LEN)]
        r = stub.Generate(
            build_generate_request(prompt, base_only=True, max_new_tokens=2, ignore_eos=True, tokens=True),
            timeout=600,
        )
        outs[i] = [tok.id for tok in r.tokens]
        with lock:
            seen.append("b")

    with lock:
        mark = len(seen)
    burst = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
    for b in burst:
        b.start()
    for b in burst:
        b.join()
    call.cancel()
    t.join(timeout=30)
    with lock:
        order = seen[mark:]
    last_burst = max(i for i, e in enumerate(order) if e == "b")
    return order[:last_burst].count("s"), outs


def test_a_burst_of_long_prompts_does_not_freeze_a_running_stream():
    served = demo_served()
    want = served.ensemble.generate_greedy(
        [[(464 + 7 * i + k) % 50000 for k in range(PROMPT_LEN)] for i in range(BURST)], [[]] * BURST, 2
    )
    during = {}
    for chunk in (CHUNK, None):
        limits = {
            "limits.prefill_chunk_tokens": chunk,
            "limits.max_prompt_tokens": PROMPT_LEN,
            "limits.max_running": 32,
        }
        with running_server(None, served, **limits) as server:
            during[chunk], outs = _burst(server, served)
        assert outs == want  # chunked or not: the unchunked core's answers
    # 16 x 1536 prompt tokens at 256 per step: the stream gets a token at (nearly) every one of ~96 steps;
    # unchunked (prefill_chunk_tokens: null), each long prompt is prefilled whole and the stream waits
    assert during[CHUNK] >= BURST * PROMPT_LEN // CHUNK // 2, during
    assert during[None] * 4 < during[CHUNK], during
