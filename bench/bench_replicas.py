"""Several replicas over one S3 store: how long a store change takes to reach every replica.

    .venv/bin/python bench/bench_replicas.py                      # 3 replicas, moto S3 on loopback, 10 flips
    .venv/bin/python bench/bench_replicas.py --poll 0.5 --flips 20

Each replica is a `sensepack serve` process (demo models) with the store subscription on
(`store.poll_interval_s`, default 1 s) over one moto S3 bucket. Measured, per replica and over all:

* alias flip: `capitals@prod` moved to another version; time until the replica serves the new version to a
  request naming `capitals@prod` (polled every 20 ms from the moment the alias moved);
* withdrawal: a routed version deleted from the store; time until the replica no longer serves it (requests
  naming it get NOT_FOUND, the route falls back), and whether any replica served it past the window;
* aggregation: every replica's /metrics scraped; `sensepack_requests_by_pack_total{pack="capitals"}` summed
  over replicas against the requests sent (what `sum by (pack)` over the replicas' `instance` labels gives).

Prints one JSON line per flip / withdrawal and a summary table; `--json` writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from bench.common import demo_server_config, pct
from bench.common import machine as bench_machine
from serve.client import Client

CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
TARGETS = [" Paris", " Rome", " Tokyo", " Berlin", " Madrid", " Lima", " Oslo", " Cairo"]


ADMITTED = [0]  # requests a replica admitted with the pack (what sensepack_requests_by_pack_total counts)
_LOCK = threading.Lock()


def served_version(port: int, ref: str) -> str | None:
    """The version a request naming `ref` is served with on this replica (None: NOT_FOUND or base)."""
    with Client(f"127.0.0.1:{port}") as c:
        try:
            out = c.generate("We flew to Mauritius", packs=[ref], max_new_tokens=1, timeout=10)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
    with _LOCK:
        ADMITTED[0] += 1
    p = out.packs[0]
    return p.version if p.arm == "pack" else None


def wait_all(
    ports: list[int], ref: str, done: Callable[[str | None], bool], timeout: float
) -> tuple[list[float], list[str]]:
    """Per replica, seconds until done(version) holds for `ref` (polled every 20 ms), and what was seen."""
    t0 = time.perf_counter()
    out: list[float] = [float("nan")] * len(ports)
    seen: list[str] = []

    def one(i: int) -> None:
        while time.perf_counter() - t0 < timeout:
            v = served_version(ports[i], ref)
            if done(v):
                out[i] = time.perf_counter() - t0
                return
            seen.append(str(v))
            time.sleep(0.02)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ports))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, seen


def scrape(port: int) -> dict[str, float]:
    from sensepack_testing.serve import parse_metrics

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--flips", type=int, default=10)
    ap.add_argument("--withdrawals", type=int, default=3)
    ap.add_argument("--poll", type=float, default=1.0, help="store.poll_interval_s of every replica")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    from edits_store.store import open_store
    from sensepack_testing import free_port
    from sensepack_testing.serve import demo_served, demo_variant, publish_edits, server_process

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every S3 request otherwise
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(CREDS, SENSEPACK_S3_ENDPOINT_URL=endpoint)  # the replicas inherit it
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="packs")
    uri = "s3://packs/store"
    store = open_store(uri)
    served = demo_served()
    n_versions = 2 + args.withdrawals
    versions = [
        publish_edits(store, served, "capitals", demo_variant(served, t), beta=1.0) for t in TARGETS[:n_versions]
    ]
    store.set_alias("capitals", "prod", versions[0])
    flips: list[dict[str, Any]] = []
    withdrawals: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        ports, metric_ports = [], []
        for _ in range(args.replicas):
            mport = free_port()
            cfg = demo_server_config(
                uri,
                server={"metrics_port": mport},
                store={"poll_interval_s": args.poll},
                packs={"preload": ["capitals@prod"]},
            )
            ports.append(stack.enter_context(server_process(cfg)))
            metric_ports.append(mport)
        for i in range(args.flips):
            target = versions[(i + 1) % 2]
            store.set_alias("capitals", "prod", target)
            took, seen = wait_all(ports, "capitals@prod", target.__eq__, timeout=30)
            stale = sum(served_version(p, "capitals@prod") != target for p in ports for _ in range(5))
            row = {
                "kind": "alias_flip",
                "seconds": took,
                "max_s": max(took),
                "polls_before": len(seen),
                "stale_after": stale,  # old answers in 5 polls per replica once every replica had flipped
            }
            flips.append(row)
            print(json.dumps(row), flush=True)
        for j in range(args.withdrawals):
            doomed = versions[2 + j]
            for p in ports:  # resident on every replica (the admin API is per replica)
                with Client(f"127.0.0.1:{p}", token="bench") as c:
                    c.load_pack(f"capitals@{doomed}", activate=False)
            before = [served_version(p, f"capitals@{doomed}") for p in ports]
            store.delete_version("capitals", doomed)
            took, seen = wait_all(ports, f"capitals@{doomed}", lambda v: v is None, timeout=30)
            stale = sum(served_version(p, f"capitals@{doomed}") is not None for p in ports for _ in range(5))
            row = {
                "kind": "withdrawal",
                "served_before": before == [doomed] * len(ports),
                "seconds": took,
                "max_s": max(took),
                "stale_after": stale,
            }
            withdrawals.append(row)
            print(json.dumps(row), flush=True)
        per = [scrape(m) for m in metric_ports]
        counts = [
            sum(v for k, v in s.items() if k.startswith("sensepack_requests_by_pack_total{") and 'pack="capitals"' in k)
            for s in per
        ]
    moto.stop()
    sent = ADMITTED[0]
    flip_s = [s for r in flips for s in r["seconds"]]
    wd_s = [s for r in withdrawals for s in r["seconds"]]
    out = {
        "command": " ".join(sys.argv),
        "machine": bench_machine(),
        "replicas": args.replicas,
        "poll_interval_s": args.poll,
        "flips": flips,
        "withdrawals": withdrawals,
        "flip_p50_s": pct(flip_s, 50),
        "flip_max_s": max(flip_s),
        "withdrawal_p50_s": pct(wd_s, 50),
        "withdrawal_max_s": max(wd_s) if wd_s else None,
        "stale_after_window": sum(r["stale_after"] for r in flips + withdrawals),
        "requests_by_pack_per_replica": counts,
        "requests_by_pack_sum": sum(counts),
        "requests_sent": sent,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(
        f"\n| replicas | poll s | alias flip p50 / max s | withdrawal p50 / max s | stale answers after | "
        f"requests_by_pack sum / sent |\n|---|---|---|---|---|---|\n| {args.replicas} | {args.poll:g} | "
        f"{out['flip_p50_s']:.2f} / {out['flip_max_s']:.2f} | "
        f"{out['withdrawal_p50_s']:.2f} / {out['withdrawal_max_s'] or float('nan'):.2f} | "
        f"{out['stale_after_window']} | "
        f"{out['requests_by_pack_sum']:.0f} / {sent} |"
    )


if __name__ == "__main__":
    main()
