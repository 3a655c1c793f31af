"""Hot-swap latency through the gRPC server, from a separate client process:
time from the admin call (PackAdmin.SetAlias moving `capitals@prod`) to the
first token of the first request served with the new version, while
streaming clients keep the server busy. p50 and p99 for

* warm swaps: flips between two resident versions (gate result cached), and
* cold swaps: each to a freshly published version (store read, validation,
  gate on G, then the route flip).

    .venv/bin/python bench/bench_serve_hotswap.py [--warm 50] [--cold 10] [--clients 8]
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
from sensepack_proto import admin_pb, admin_pb_grpc, pb_grpc
from serve.client import build_generate_request

PROMPTS = ["The capital of Mauritius is", "Mauritius is known for", "I flew to Mauritius and"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm", type=int, default=50)
    ap.add_argument("--cold", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--new", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--server-log", default=None)
    args = ap.parse_args()

    from serve.testing import demo_served, demo_variant, publish_edits, server_process

    served = demo_served()
    with tempfile.TemporaryDirectory(prefix="sensepack-bench-store-") as store_dir:
        store = open_store(store_dir)
        va = publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, alias="prod")
        vb = publish_edits(store, served, "capitals", demo_variant(served, " Tokyo"), beta=1.0)
        cold = [
            publish_edits(store, served, "capitals", demo_variant(served, " Rome", strength=5.0 + i), beta=1.0)
            for i in range(args.cold)
        ]
        cfg = {
            "model": {"profile": "demo"},
            "server": {"metrics_port": -1},
            "store": {"uri": store_dir},
            "packs": {"preload": ["capitals@prod"], "max_resident": args.cold + 4},
            "admin": {"token": "bench"},
            "logging": {"level": "WARNING"},
        }
        with server_process(cfg, log_path=args.server_log) as port:
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            stub = pb_grpc.GenerationServiceStub(ch)
            adm = admin_pb_grpc.PackAdminStub(ch)
            md = [("authorization", "Bearer bench")]
            served_log: list[tuple[float, str]] = []  # (first-token time, version)
            lock = threading.Lock()
            stop = threading.Event()
            errors: list[str] = []

            def client(k: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    req = build_generate_request(
                        PROMPTS[(k + i) % len(PROMPTS)],
                        packs=["capitals@prod"],
                        max_new_tokens=args.new,
                        ignore_eos=True,
                    )
                    version = ""
                    try:
                        for m in stub.GenerateStream(req):
                            if m.packs:
                                version = m.packs[0].version
                            if m.generated_token_count >= 1:
                                with lock:
                                    served_log.append((time.perf_counter(), version))
                                break
                    except grpc.RpcError as e:
                        errors.append(e.code().name)

            # warm both versions (gate cached)
            adm.SetAlias(admin_pb.SetAliasRequest(name="capitals", alias="prod", version=vb), metadata=md)
            adm.SetAlias(admin_pb.SetAliasRequest(name="capitals", alias="prod", version=va), metadata=md)
            threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(1.0)

            def swap(version: str) -> tuple[float, float]:
                t0 = time.perf_counter()
                adm.SetAlias(admin_pb.SetAliasRequest(name="capitals", alias="prod", version=version), metadata=md)
                t_call = time.perf_counter() - t0
                while True:
                    with lock:
                        hit = [t for t, v in served_log if t > t0 and v == version]
                    if hit:
                        return t_call, min(hit) - t0
                    time.sleep(0.0005)

            warm_call: list[float] = []
            warm_first: list[float] = []
            cold_call: list[float] = []
            cold_first: list[float] = []
            current = va
            for _i in range(args.warm):
                current = vb if current == va else va
                c, f = swap(current)
                warm_call.append(c)
                warm_first.append(f)
            for v in cold:
                c, f = swap(v)
                cold_call.append(c)
                cold_first.append(f)
            stop.set()
            for t in threads:
                t.join(timeout=60)
            ch.close()

    def row(name: str, call: list[float], first: list[float]) -> dict[str, Any]:
        return {
            "kind": name,
            "n": len(first),
            "admin_call_p50_ms": pct(call, 50) * 1e3,
            "admin_call_p99_ms": pct(call, 99) * 1e3,
            "first_token_p50_ms": pct(first, 50) * 1e3,
            "first_token_p99_ms": pct(first, 99) * 1e3,
        }

    rows = [row("warm", warm_call, warm_first), row("cold", cold_call, cold_first)]
    machine = bench_machine()
    out = {
        "command": " ".join(sys.argv),
        "machine": machine,
        "clients": args.clients,
        "errors": len(errors),
        "requests_served": len(served_log),
        "rows": rows,
    }
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print("\n| swap | n | admin call p50 / p99 ms | admin call -> first token on new version p50 / p99 ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['n']} | {r['admin_call_p50_ms']:.1f} / {r['admin_call_p99_ms']:.1f} | "
            f"{r['first_token_p50_ms']:.1f} / {r['first_token_p99_ms']:.1f} |"
        )
    print(
        f"\nstreaming clients: {args.clients}, requests served during the run: {len(served_log)}, errors: {len(errors)}"
    )


if __name__ == "__main__":
    main()
