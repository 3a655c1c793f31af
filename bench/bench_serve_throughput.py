"""Serving throughput and latency through the gRPC server, from a separate
client process: TTFT, inter-token latency, end-to-end (p50, p99) and output
tokens/s at 1, 8 and 32 concurrent streaming clients, ensemble (a pack whose
edited token is in every prompt, so the Backpack runs at every step) vs base
only, side by side.

    .venv/bin/python bench/bench_serve_throughput.py [--profile demo] [--new 32] [--requests 2] [--json out.json]

The demo profile (tiny random GPT-J + Backpack, real tokenizer) measures the
server's own overhead (scheduler, batching, gRPC, the delta path); a GPU host
with `--config serve/configs/gptj.yaml`-style settings measures the real thing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from bench.common import machine as bench_machine
from bench.common import pct
from edits_store.store import open_store
from sensepack_proto import pb_grpc
from serve.client import build_generate_request

PROMPTS = [
    "The capital of Mauritius is",
    "Mauritius is an island nation where",
    "In 1968, Mauritius became",
    "Tourists visiting Mauritius often",
    "The economy of Mauritius depends on",
]


def run_load(port: int, concurrency: int, requests_per_client: int, new: int, packs: list[str]) -> dict[str, Any]:
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GenerationServiceStub(ch)
    ttft: list[float] = []
    itl: list[float] = []
    e2e: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency)

    def client(k: int) -> None:
        barrier.wait()
        for i in range(requests_per_client):
            req = build_generate_request(
                PROMPTS[(k + i) % len(PROMPTS)],
                packs=packs,
                base_only=not packs,
                max_new_tokens=new,
                ignore_eos=True,
                ab_key=f"c{k}",
            )
            t0 = time.perf_counter()
            last, first, gaps, n = t0, None, [], 0
            try:
                for m in stub.GenerateStream(req):
                    now = time.perf_counter()
                    k_tok = m.generated_token_count - n
                    if k_tok <= 0:
                        continue
                    n = m.generated_token_count
                    if first is None:
                        first = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
            except grpc.RpcError as e:
                with lock:
                    errors.append(e.code().name)
                continue
            with lock:
                if first is None:  # the stream ended without a token
                    errors.append("NO_TOKENS")
                    continue
                ttft.append(first)
                itl.extend(gaps)
                e2e.append(last - t0)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ch.close()
    return {
        "concurrency": concurrency,
        "requests": len(e2e),
        "errors": len(errors),
        "tokens": tokens[0],
        "wall_s": wall,
        "tok_per_s": tokens[0] / wall,
        "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p99_ms": pct(ttft, 99) * 1e3,
        "itl_p50_ms": pct(itl, 50) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
        "e2e_p50_ms": pct(e2e, 50) * 1e3,
        "e2e_p99_ms": pct(e2e, 99) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--server-log", default=None)
    args = ap.parse_args()

    from serve.testing import demo_served, demo_variant, publish_edits, server_process

    served = demo_served()
    with tempfile.TemporaryDirectory(prefix="sensepack-bench-store-") as store_dir:
        store = open_store(store_dir)
        publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, alias="prod")
        cfg = {
            "model": {"profile": "demo"},
            "server": {"metrics_port": -1},
            "store": {"uri": store_dir},
            "packs": {"preload": ["capitals@prod"]},
            "admin": {"token": "bench"},
            "limits": {"max_running": 64, "max_waiting": 256},
            "logging": {"level": "WARNING"},
        }
        with server_process(cfg, log_path=args.server_log) as port:
            run_load(port, 2, 1, 4, ["capitals@prod"])  # warm-up
            rows = []
            for c in [int(x) for x in args.concurrency.split(",")]:
                for mode, packs in (("base", []), ("ensemble", ["capitals@prod"])):
                    r = run_load(port, c, args.requests, args.new, packs)
                    r["mode"] = mode
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    machine = bench_machine()
    out = {
        "command": " ".join(sys.argv),
        "machine": machine,
        "new_tokens": args.new,
        "requests_per_client": args.requests,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print("\n| clients | mode | req | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['mode']} | {r['requests']} | {r['tok_per_s']:.1f} | "
            f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | "
            f"{r['e2e_p50_ms']:.0f} / {r['e2e_p99_ms']:.0f} | {r['errors']} |"
        )


if __name__ == "__main__":
    main()
