"""Score in bounded memory, beside decoding: a 64 x 1024-token Score (base and
pack) against a server in its own process while one stream decodes. Records
the server's peak RSS (VmHWM) before and after, the Score's wall time, the
stream's inter-token latency (p50 / p99) before and during the Score, and how
long a Score cut by its deadline keeps the engine busy.

    .venv/bin/python bench/bench_serve_score.py [--conts 64] [--len 1024] [--json out.json]

Without chunking the Score would hold float32 logits over the 50257 shared ids
for every position: conts x (prefix + len) x 50257 x 4 bytes (x2 with
log_softmax), ~13.5 GB for 64 x 1048 tokens; the bound now is one chunk
(128 x 50257 x 4 bytes, ~25 MB, a few copies) plus the model's activations.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from bench.common import machine as bench_machine
from bench.common import pct
from edits_store.store import open_store
from sensepack_proto import pb, pb_grpc
from serve.client import build_generate_request


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) of the process in MiB."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        lines = f.readlines()
    for line in lines:
        if line.startswith(("VmHWM", "VmRSS")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) / 1024
    return vals["VmHWM"], vals["VmRSS"]


def score_request(n: int, length: int) -> pb.ScoreRequest:
    req = pb.ScoreRequest(packs=[pb.PackSpec(ref="capitals@prod")], include_base=True)
    req.prefix_token_ids.ids.extend(range(1000, 1024))
    for i in range(n):
        # the pack's edited token (" Mauritius") inside every continuation: the delta path runs
        ids = [(7 * i + 13 * k) % 50000 + 100 for k in range(length)]
        ids[length // 2 : length // 2 + 2] = [46106, 3754]
        req.continuations.add(token_ids=pb.TokenIds(ids=ids))
    return req


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conts", type=int, default=64)
    ap.add_argument("--len", type=int, default=1024)
    ap.add_argument("--deadline", type=float, default=3.0, help="seconds, for the cut-by-deadline Score")
    ap.add_argument("--json", default=None)
    ap.add_argument("--server-log", default=None)
    args = ap.parse_args()

    from serve.testing import demo_served, demo_variant, publish_edits, server_process

    served = demo_served()
    with tempfile.TemporaryDirectory(prefix="sensepack-bench-store-") as store_dir:
        store = open_store(store_dir)
        publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, alias="prod")
        cfg = {
            "model": {"profile": "demo", "torch_threads": 2},
            "server": {"metrics_port": -1},
            "store": {"uri": store_dir},
            "packs": {"preload": ["capitals@prod"]},
            "admin": {"token": "bench"},
            "limits": {"max_new_tokens": 2000, "max_prompt_tokens": 1536},
            "logging": {"level": "WARNING"},
        }
        with server_process(cfg, log_path=args.server_log, with_pid=True) as (port, pid):
            stub = pb_grpc.GenerationServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            stub.Score(score_request(1, 64))  # warm-up of the Score path
            hwm0, rss0 = peak_rss_mb(pid)
            gaps: list[tuple[float, float]] = []  # (time, gap)
            stop = threading.Event()

            def decode() -> None:
                while not stop.is_set():
                    last = None
                    call = stub.GenerateStream(
                        build_generate_request("Hello Mauritius", base_only=True, max_new_tokens=2000, ignore_eos=True)
                    )
                    for _msg in call:
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append((now, now - last))
                        last = now
                        if stop.is_set():
                            call.cancel()
                            break

            t = threading.Thread(target=decode, daemon=True)
            t.start()
            time.sleep(3.0)
            t0 = time.perf_counter()
            resp = stub.Score(score_request(args.conts, args.len), timeout=3600)
            t1 = time.perf_counter()
            hwm1, _rss1 = peak_rss_mb(pid)
            assert len(resp.continuations) == args.conts
            # a Score cut by its deadline: how long until decoding runs at its idle pace again
            t2 = time.perf_counter()
            try:
                stub.Score(score_request(args.conts, args.len), timeout=args.deadline)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
            time.sleep(5.0)
            stop.set()
            t.join(timeout=60)
            before = [g for ts, g in gaps if ts < t0]
            during = [g for ts, g in gaps if t0 <= ts <= t1]
            after_cut = [(ts - t2, g) for ts, g in gaps if ts > t2 + args.deadline]
            idle_p99 = pct(before, 99)
            busy_until = max([ts for ts, g in after_cut if g > 3 * max(idle_p99, 1e-3)], default=args.deadline)
            result = {
                "conts": args.conts,
                "len": args.len,
                "score_s": round(t1 - t0, 2),
                "rss_before_mb": round(rss0, 1),
                "peak_rss_before_mb": round(hwm0, 1),
                "peak_rss_after_mb": round(hwm1, 1),
                "peak_rss_growth_mb": round(hwm1 - hwm0, 1),
                "itl_before_p50_ms": round(1e3 * pct(before, 50), 2),
                "itl_before_p99_ms": round(1e3 * idle_p99, 2),
                "itl_during_p50_ms": round(1e3 * pct(during, 50), 2),
                "itl_during_p99_ms": round(1e3 * pct(during, 99), 2),
                "itl_during_max_ms": round(1e3 * max(during), 2),
                "tokens_during": len(during),
                "deadline_s": args.deadline,
                "slow_steps_after_deadline_until_s": round(busy_until, 2),
            }
            print(json.dumps(result), flush=True)
    machine = bench_machine()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "result": result}, indent=2))


if __name__ == "__main__":
    main()
