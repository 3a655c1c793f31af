"""Many packs on one server: a store of thousands of packs, hundreds to a thousand resident, and a
closed-loop workload in which every request names 1-3 packs drawn from a Zipf popularity.

    .venv/bin/python bench/bench_many_packs.py                      # 10,000 packs, 1,000 resident, batch 8 and 32
    .venv/bin/python bench/bench_many_packs.py --quick              # small, prints one JSON line
    .venv/bin/python bench/bench_many_packs.py --profile smollm2    # the SmolLM2 pairing's sense model

Printed side by side in one run, for each concurrency:

* output tokens/s of three workloads on the same server: every request names one pack (`single`); 1-3 packs
  per request from the Zipf restricted to the resident packs (`mixed`: heterogeneous batches, no cold loads);
  1-3 packs from the Zipf over the whole store (`zipf`: the tail loads cold, gate included).
  `ratio_vs_single_pack` is mixed / single.
* p50/p99 time to first token of `zipf` requests whose packs were all resident vs those that named a pack
  for the first time past the preloaded set (cold: load, validation and the activation gate on the way);
* the server's resident set size against the number and bytes of resident packs;
* store listing and resolution time at this size (local folder; `--s3` also a moto S3 server).

Every pack's edits include senses of the " Mauritius" tokens, which every prompt contains, so every row runs
the Backpack (no exact skip). Sizes are drawn log-uniformly between 20 and 2,000 sense rows. The store is
built once and cached under `--store` (default runs/bench-many-packs/<profile>-<packs>).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import torch
from tqdm import tqdm

from bench.common import PROMPTS, demo_server_config, pct
from bench.common import machine as bench_machine
from sensepack_proto import pb_grpc
from serve.client import Client, build_generate_request

ADMIN = "bench"
MIN_ROWS, MAX_ROWS = 20, 2000


def pack_name(i: int) -> str:
    return f"p{i:05d}"


def model_section(profile: str) -> dict[str, Any]:
    if profile == "demo":
        return {"profile": "demo"}
    return {
        "profile": "pretrained",
        "large_model": "smollm2-135m-instruct",
        "backpack": "sense-smollm2",
        "tokenizer": "smollm2-135m-instruct",
    }


def served_for(profile: str) -> Any:
    from serve.config import ModelConfig
    from serve.models import build_served

    return build_served(ModelConfig(**model_section(profile)))


def draw_edits(served: Any, i: int) -> Any:
    """Pack i's SenseEdits: log-uniform 20-2,000 sense rows, always on the trigger's tokens."""
    from ensemble.edits import SenseEdits

    rng = random.Random(i)
    cfg = served.backpack.config
    k = cfg.num_senses
    rows = round(math.exp(rng.uniform(math.log(MIN_ROWS), math.log(MAX_ROWS))))
    trigger = served.tokenizer(" Mauritius").input_ids
    n_tok = max(len(trigger), math.ceil(rows / k))
    pool = [t for t in rng.sample(range(256, served.vocab.size), n_tok) if t not in trigger]
    tokens = list(trigger) + pool[: n_tok - len(trigger)]
    pairs = [(t, s) for t in tokens for s in range(k)]
    keep = pairs[: len(trigger) * k] + rng.sample(pairs[len(trigger) * k :], max(0, rows - len(trigger) * k))
    g = torch.Generator().manual_seed(i)
    deltas = torch.randn(len(keep), cfg.n_embd, generator=g) * 0.05
    tok = torch.tensor([t for t, _ in keep], dtype=torch.long)
    return SenseEdits(tok, torch.tensor([s for _, s in keep], dtype=torch.long), deltas)


def build_store(path: Path, profile: str, n: int) -> dict[str, int]:
    """The cached store of n packs (built once); returns name -> sense rows."""
    from edits_store.store import open_store
    from serve.models import pack_from_edits

    marker = path / "bench-many-packs.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("profile") == profile and meta.get("packs") == n:
            return {k: int(v) for k, v in meta["rows"].items()}
    served = served_for(profile)
    path.mkdir(parents=True, exist_ok=True)
    store = open_store(str(path))
    done = set(store.list_packs())
    rows: dict[str, int] = {}
    for i in tqdm(range(n), desc=f"store: {n} packs", unit="pack"):
        edits = draw_edits(served, i)
        rows[pack_name(i)] = len(edits)
        if pack_name(i) in done:
            continue
        store.publish(pack_from_edits(pack_name(i), edits, served, beta=1.0, epsilon=1.0))
    marker.write_text(json.dumps({"profile": profile, "packs": n, "rows": rows}))
    return rows


def store_timings(uri: str, n: int, samples: int = 200) -> dict[str, float]:
    from edits_store.store import open_store

    store = open_store(uri)
    t0 = time.perf_counter()
    names = store.list_packs()
    list_s = time.perf_counter() - t0
    rng = random.Random(0)
    picks = [pack_name(rng.randrange(n)) for _ in range(samples)]
    t0 = time.perf_counter()
    for name in picks:
        store.resolve(name)
    resolve_ms = (time.perf_counter() - t0) / samples * 1e3
    out = {"listed": len(names), "list_s": list_s, "resolve_ms": resolve_ms}
    # One subscription poll: the whole store (a watcher of every name) against the names a server serves.
    t0 = time.perf_counter()
    store.backend.scan()
    out["poll_all_s"] = time.perf_counter() - t0
    for served in (100, 1000):
        watched = sorted(set(rng.sample(names, min(served, len(names)))))
        t0 = time.perf_counter()
        store.backend.scan(watched)
        out[f"poll_{served}_s"] = time.perf_counter() - t0
    return out


def s3_timings(profile: str, n: int, samples: int) -> dict[str, float]:
    """Publish the same n packs into a moto S3 store on loopback (8 writer threads) and time listing and
    resolution there."""
    import boto3
    from moto.server import ThreadedMotoServer

    from edits_store.store import open_store
    from sensepack_testing import free_port
    from serve.models import pack_from_edits

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="packs")
        uri = "s3://packs/store"
        store = open_store(uri, endpoint_url=endpoint)
        served = served_for(profile)
        t0 = time.perf_counter()

        def publish(i: int) -> None:
            store.publish(pack_from_edits(pack_name(i), draw_edits(served, i), served, beta=1.0, epsilon=1.0))

        with ThreadPoolExecutor(8) as ex:
            list(tqdm(ex.map(publish, range(n)), total=n, desc="s3: publish", unit="pack"))
        out = {"publish_s": time.perf_counter() - t0}
        os.environ["SENSEPACK_S3_ENDPOINT_URL"] = endpoint
        out.update(store_timings(uri, n, samples))
        return out
    finally:
        server.stop()


class Zipf:
    """Ranks 0..n-1 with P(r) ∝ 1/(r+1)^s."""

    def __init__(self, n: int, s: float, seed: int):
        w = [1.0 / (r + 1) ** s for r in range(n)]
        total = sum(w)
        acc, self.cdf = 0.0, []
        for x in w:
            acc += x / total
            self.cdf.append(acc)
        self.rng = random.Random(seed)

    def draw(self, below: int) -> int:
        import bisect

        u = self.rng.random() * self.cdf[below - 1]
        return min(bisect.bisect_left(self.cdf, u), below - 1)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_load(
    port: int,
    concurrency: int,
    requests_per_client: int,
    new: int,
    pick: Callable[[int, int], list[str]],
    resident: set[str],
) -> dict[str, Any]:
    """Closed loop: `concurrency` clients, each sending `requests_per_client` streaming requests one after
    another; `pick(client, i)` names the request's packs."""
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GenerationServiceStub(ch)
    warm_ttft: list[float] = []
    cold_ttft: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency)

    def client(k: int) -> None:
        barrier.wait()
        for i in range(requests_per_client):
            packs = pick(k, i)
            with lock:
                cold = any(p not in resident for p in packs)
                resident.update(packs)
            req = build_generate_request(
                PROMPTS[(k + i) % len(PROMPTS)], packs=packs, max_new_tokens=new, ignore_eos=True, ab_key=f"c{k}"
            )
            t0 = time.perf_counter()
            first, n = None, 0
            try:
                for m in stub.GenerateStream(req, timeout=600):
                    if m.generated_token_count > n:
                        n = m.generated_token_count
                        if first is None:
                            first = time.perf_counter() - t0
            except grpc.RpcError as e:
                with lock:
                    errors.append(f"{e.code().name}: {e.details()}")
                continue
            with lock:
                tokens[0] += n
                if first is not None:
                    (cold_ttft if cold else warm_ttft).append(first)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ch.close()
    return {
        "requests": len(warm_ttft) + len(cold_ttft),
        "cold_requests": len(cold_ttft),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": tokens[0],
        "wall_s": wall,
        "tok_per_s": tokens[0] / wall,
        "ttft_p50_ms": pct(warm_ttft, 50) * 1e3,
        "ttft_p99_ms": pct(warm_ttft, 99) * 1e3,
        "cold_ttft_p50_ms": pct(cold_ttft, 50) * 1e3,
        "cold_ttft_p99_ms": pct(cold_ttft, 99) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo", choices=["demo", "smollm2"])
    ap.add_argument("--packs", type=int, default=10_000, help="packs in the store")
    ap.add_argument("--resident", type=int, default=1_000, help="packs.max_resident; this many are preloaded")
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--requests", type=int, default=8, help="requests per client per workload")
    ap.add_argument("--new", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    ap.add_argument("--rounds", type=int, default=3, help="single / mixed alternations per concurrency")
    ap.add_argument("--store", default=None, help="store folder (built once and reused)")
    ap.add_argument("--s3", action="store_true", help="also time listing and resolution on a moto S3 copy")
    ap.add_argument(
        "--gate-texts",
        type=int,
        default=None,
        help="gate.max_texts (and 64 tokens per text) for the server: a cheaper gate on a real pairing",
    )
    ap.add_argument("--store-only", action="store_true", help="build and time the stores, start no server")
    ap.add_argument("--quick", action="store_true", help="200 packs, 50 resident, batch 8; one JSON line")
    ap.add_argument("--json", default=None, help="write every number to this file")
    ap.add_argument("--server-log", default=None)
    args = ap.parse_args()
    if args.quick:
        args.packs, args.resident, args.concurrency, args.requests, args.new, args.rounds = 200, 50, "8", 3, 8, 1
    concurrency = [int(x) for x in args.concurrency.split(",")]
    if not 0 < args.resident <= args.packs:
        ap.error("--resident must be in [1, --packs]")

    from sensepack_testing.serve import server_process

    store_dir = Path(args.store or f"runs/bench-many-packs/{args.profile}-{args.packs}")
    t0 = time.perf_counter()
    rows = build_store(store_dir, args.profile, args.packs)
    build_s = time.perf_counter() - t0
    stores = {"local": store_timings(str(store_dir), args.packs)}
    if args.s3:
        stores["s3"] = s3_timings(args.profile, args.packs, 50)
    if args.store_only:
        print(json.dumps({"packs": args.packs, "store_build_s": build_s, "store": stores}))
        return
    d = served_for(args.profile).backpack.config.n_embd
    pack_bytes = {name: r * (d * 4 + 16) for name, r in rows.items()}  # deltas (float32) + token and sense ids

    cfg = demo_server_config(
        str(store_dir),
        model=model_section(args.profile),
        packs={"preload": [], "load_on_request": True, "max_resident": args.resident},
        limits={"max_running": 64, "max_waiting": 512},
        store={"subscribe": False},
        **({"gate": {"max_texts": args.gate_texts, "max_tokens_per_text": 64}} if args.gate_texts else {}),
    )
    out: dict[str, Any] = {"command": " ".join(sys.argv), "machine": bench_machine(), "store_build_s": build_s}
    out["store"] = stores
    results: list[dict[str, Any]] = []
    with server_process(cfg, log_path=args.server_log, with_pid=True) as (port, pid):
        rss0 = rss_bytes(pid)
        preload = [pack_name(r) for r in range(args.resident)]  # rank r is pack r
        t0 = time.perf_counter()
        load_s: list[float] = []

        def load(name: str) -> None:
            with Client(f"127.0.0.1:{port}", token=ADMIN) as c:
                t = time.perf_counter()
                c.load_pack(name, activate=False)  # resident, unrouted: evictable like any cached pack
                load_s.append(time.perf_counter() - t)

        with ThreadPoolExecutor(2) as ex:
            list(tqdm(ex.map(load, preload), total=len(preload), desc="preload", unit="pack"))
        out["preload"] = {
            "packs": len(preload),
            "wall_s": time.perf_counter() - t0,
            "load_p50_ms": pct(load_s, 50) * 1e3,
            "load_p99_ms": pct(load_s, 99) * 1e3,
        }
        rss1 = rss_bytes(pid)
        out["memory"] = {
            "rss_before_preload": rss0,
            "rss_after_preload": rss1,
            "resident_packs": len(preload),
            "resident_pack_bytes": sum(pack_bytes[p] for p in preload),
        }
        seen = set(preload)
        zipf = Zipf(args.packs, args.zipf, seed=1)
        sizes = random.Random(2)

        def single(k: int, i: int) -> list[str]:
            return [pack_name(0)]

        def mixed(below: int) -> Callable[[int, int], list[str]]:
            def pick(k: int, i: int) -> list[str]:
                n = sizes.randint(1, 3)
                names: list[str] = []
                while len(names) < n:
                    p = pack_name(zipf.draw(below))
                    if p not in names:
                        names.append(p)
                return names

            return pick

        run_load(port, 2, 1, 4, single, seen)  # warm-up
        # single and mixed first at every concurrency: the zipf workload's cold loads evict preloaded packs
        # single and mixed alternate, `--rounds` times; zipf last (its cold loads evict preloaded packs)
        plan = [(k, c, arm) for k in range(args.rounds) for c in concurrency for arm in ("single", "mixed")]
        plan += [(0, c, "zipf") for c in concurrency]
        picks = {"single": single, "mixed": mixed(args.resident), "zipf": mixed(args.packs)}
        for k, c, arm in plan:
            r = run_load(port, c, args.requests, args.new, picks[arm], seen if arm == "zipf" else set(seen))
            r.update(arm=arm, concurrency=c, round=k)
            results.append(r)
            print(json.dumps(r), flush=True)
        with Client(f"127.0.0.1:{port}", token=ADMIN) as cl:
            listed = cl.list_packs(include_store=False)
        out["memory"]["rss_end"] = rss_bytes(pid)
        out["memory"]["resident_packs_end"] = len(listed.resident)
        out["memory"]["resident_pack_bytes_end"] = sum(
            pack_bytes.get(r.name, 0) for r in listed.resident if r.name in pack_bytes
        )
    out["rows"] = results
    by = {(r["arm"], r["concurrency"], r["round"]): r for r in results}
    # per concurrency: the median over rounds of mixed / single measured side by side
    ratios = {
        c: statistics.median(
            by[("mixed", c, k)]["tok_per_s"] / by[("single", c, k)]["tok_per_s"] for k in range(args.rounds)
        )
        for c in concurrency
    }
    out["ratio_vs_single_pack"] = ratios
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    cold = [r["cold_ttft_p99_ms"] for r in results if r["arm"] == "zipf" and r["cold_requests"]]
    summary = {
        "ratio_vs_single_pack": min(ratios.values()),
        "resident_packs": out["memory"]["resident_packs_end"],
        "resident_pack_bytes": out["memory"]["resident_pack_bytes_end"],
        "rss_bytes": out["memory"]["rss_end"],
        "cold_ttft_p99_ms": max(cold) if cold else None,
        "errors": sum(r["errors"] for r in results),
    }
    if args.quick:
        print(json.dumps(summary))
        return
    m = out["memory"]
    print("ratio_vs_single_pack (median over rounds): " + ", ".join(f"{c}: {x:.3f}" for c, x in ratios.items()))
    print(
        f"\nstore: {args.packs} packs built/reused in {build_s:.1f} s; "
        + "; ".join(
            f"{k}: list {v['list_s']:.2f} s, resolve {v['resolve_ms']:.2f} ms, subscription poll of every name "
            f"{v['poll_all_s']:.2f} s / of 1,000 served {v['poll_1000_s']:.2f} s / of 100 {v['poll_100_s']:.3f} s"
            for k, v in stores.items()
        )
    )
    print(
        f"preload: {out['preload']['packs']} packs in {out['preload']['wall_s']:.1f} s "
        f"(load p50 {out['preload']['load_p50_ms']:.0f} ms, p99 {out['preload']['load_p99_ms']:.0f} ms)"
    )
    print(
        f"memory: RSS {m['rss_before_preload'] / 2**20:.0f} MiB -> {m['rss_after_preload'] / 2**20:.0f} MiB "
        f"with {m['resident_packs']} packs ({m['resident_pack_bytes'] / 2**20:.0f} MiB of edits); end "
        f"{m['rss_end'] / 2**20:.0f} MiB, {m['resident_packs_end']} resident "
        f"({m['resident_pack_bytes_end'] / 2**20:.0f} MiB)"
    )
    print(
        "\n| clients | round | workload | req (cold) | tok/s | vs single | TTFT p50 / p99 ms | cold TTFT p50 / p99 ms "
        "| errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base = by[("single", r["concurrency"], r["round"])]["tok_per_s"]
        print(
            f"| {r['concurrency']} | {r['round']} | {r['arm']} | {r['requests']} ({r['cold_requests']}) | "
            f"{r['tok_per_s']:.1f} | "
            f"{r['tok_per_s'] / base:.3f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
            f"{r['cold_ttft_p50_ms']:.0f} / {r['cold_ttft_p99_ms']:.0f} | {r['errors']} |"
        )


if __name__ == "__main__":
    main()
