"""HTTP (OpenAI-compatible, SSE through the official `openai` client) vs gRPC (GenerateStream) against
the same server process, in one run: time to first token, end-to-end latency (p50, p99), requests/s
and tokens/s at 1, 8 and 32 concurrent streaming clients, side by side with the HTTP/gRPC ratio.

    .venv/bin/python bench/bench_http.py [--new 32] [--requests 2] [--concurrency 1,8,32] [--json out.json]

Greedy, the `capitals@prod` pack in every request (the Backpack runs), ignore_eos: both front-ends
ask the engine for exactly the same work, so the difference is the front-end's own cost (HTTP/JSON/SSE
and the client library vs gRPC/protobuf). Demo profile: tiny random models, where that cost is the
largest share of the total.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import openai

from bench.common import PACK, PROMPTS, demo_server_config, demo_store, pct
from bench.common import machine as bench_machine
from sensepack_proto import pb_grpc
from serve.client import build_generate_request


class NoTokens(RuntimeError):
    """A stream that ended without a token (counted as an error, never as a latency)."""


def _first(first: float | None) -> float:
    if first is None:
        raise NoTokens("the stream ended without a token")
    return first


def _grpc_one(stub: Any, prompt: str, new: int, k: int) -> tuple[float, float, int]:
    req = build_generate_request(prompt, packs=[PACK], max_new_tokens=new, ignore_eos=True, ab_key=f"c{k}")
    t0, first, n = time.perf_counter(), None, 0
    for m in stub.GenerateStream(req):
        if m.generated_token_count > n:
            n = m.generated_token_count
            if first is None:
                first = time.perf_counter() - t0
    return _first(first), time.perf_counter() - t0, n


def _http_one(client: openai.OpenAI, prompt: str, new: int, k: int) -> tuple[float, float, int]:
    t0, first, n = time.perf_counter(), None, 0
    stream = client.completions.create(
        model="demo",
        prompt=prompt,
        max_tokens=new,
        temperature=0,
        stream=True,
        user=f"c{k}",
        extra_body={"packs": [PACK], "ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            n += 1  # one SSE event per token
            if first is None:
                first = time.perf_counter() - t0
    return _first(first), time.perf_counter() - t0, n


def run_load(
    frontend: str, grpc_port: int, http_port: int, concurrency: int, per_client: int, new: int
) -> dict[str, Any]:
    ch = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pb_grpc.GenerationServiceStub(ch)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="bench", max_retries=0, timeout=600)

    def one(prompt: str, k: int) -> tuple[float, float, int]:
        return _grpc_one(stub, prompt, new, k) if frontend == "grpc" else _http_one(client, prompt, new, k)

    ttft: list[float] = []
    e2e: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency)

    def worker(k: int) -> None:
        barrier.wait()
        for i in range(per_client):
            try:
                first, total, n = one(PROMPTS[(k + i) % len(PROMPTS)], k)
            except (grpc.RpcError, openai.OpenAIError, NoTokens) as e:  # counted and shown
                with lock:
                    errors.append(type(e).__name__)
                continue
            with lock:
                ttft.append(first)
                e2e.append(total)
                tokens[0] += n

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ch.close()
    client.close()
    return {
        "frontend": frontend,
        "concurrency": concurrency,
        "requests": len(e2e),
        "errors": len(errors),
        "tokens": tokens[0],
        "wall_s": wall,
        "req_per_s": len(e2e) / wall,
        "tok_per_s": tokens[0] / wall,
        "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p99_ms": pct(ttft, 99) * 1e3,
        "e2e_p50_ms": pct(e2e, 50) * 1e3,
        "e2e_p99_ms": pct(e2e, 99) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--server-log", default=None)
    args = ap.parse_args()

    from sensepack_testing import free_port
    from sensepack_testing.serve import server_process

    with demo_store() as (_, _, store_dir):
        http_port = free_port()
        cfg = demo_server_config(
            store_dir,
            http={"enabled": True, "port": http_port, "served_model_name": "demo"},
            limits={"max_running": 64, "max_waiting": 256},
        )
        with server_process(cfg, log_path=args.server_log) as grpc_port:
            for fe in ("grpc", "http"):  # warm-up
                run_load(fe, grpc_port, http_port, 2, 1, 4)
            rows = []
            for c in [int(x) for x in args.concurrency.split(",")]:
                for fe in ("grpc", "http"):
                    r = run_load(fe, grpc_port, http_port, c, args.requests, args.new)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    machine = bench_machine()
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "machine": machine,
                    "new_tokens": args.new,
                    "requests_per_client": args.requests,
                    "rows": rows,
                },
                indent=2,
            )
        )
    print(f"\nmachine: {machine}")
    print("\n| clients | front-end | req | req/s | tok/s | TTFT p50 / p99 ms | e2e p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['frontend']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
            f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['e2e_p50_ms']:.0f} / {r['e2e_p99_ms']:.0f} | "
            f"{r['errors']} |"
        )
    print("\n| clients | tok/s HTTP / gRPC | TTFT p50 HTTP / gRPC | e2e p50 HTTP / gRPC |")
    print("|---|---|---|---|")
    by = {(r["concurrency"], r["frontend"]): r for r in rows}
    for c in sorted({r["concurrency"] for r in rows}):
        h, g = by[(c, "http")], by[(c, "grpc")]
        print(
            f"| {c} | {h['tok_per_s'] / g['tok_per_s']:.2f} | {h['ttft_p50_ms'] / g['ttft_p50_ms']:.2f} | "
            f"{h['e2e_p50_ms'] / g['e2e_p50_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
