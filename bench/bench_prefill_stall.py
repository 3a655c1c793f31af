"""Do long prompts stall running streams? Decode inter-token gaps of streams already running while a burst
of long prompts arrives, with chunked prefill (limits.prefill_chunk_tokens) and without, side by side in
one run, on a server in its own process (gRPC on loopback).

    .venv/bin/python bench/bench_prefill_stall.py [--profile smollm2] [--chunks none,64,128,256] \
        [--streams 8] [--burst 16] [--prompt-len 1536] [--json out.json]

Per setting: S streams decode (base model, ignore_eos); once each has produced a few tokens (the quiet
phase) B requests of `--prompt-len` prompt tokens and 2 new tokens arrive at once. It prints the streams'
gaps in the quiet phase (p50/p99) and during the burst (p50/p99/max), max burst gap / quiet p99 (goal
<= 3), the burst's wall time, the tokens processed per second during the burst (prompt + generated; this
counts a stream's decode token like a prompt token, so it favours starving the streams), and the time the
whole workload took (every stream runs to `--stream-new` tokens, the burst completes): the same work in
every setting, so unchunked / chunked time is the throughput ratio (goal >= 0.95).
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

import itertools

import grpc

from bench.common import PROMPTS, pct
from bench.common import machine as bench_machine
from sensepack_proto import pb_grpc
from serve.client import build_generate_request

QUIET_TOKENS = 30  # tokens each stream produces before the burst (the quiet phase)
SETTLE = 5  # the first gaps of each stream are left out of the quiet phase (the other streams still joining)


def model_section(profile: str) -> dict[str, Any]:
    if profile == "demo":
        return {"profile": "demo"}
    return {
        "profile": "pretrained",
        "large_model": "smollm2-135m-instruct",
        "backpack": "sense-smollm2",
        "tokenizer": "smollm2-135m-instruct",
    }


def run_setting(port: int, streams: int, burst: int, prompt_len: int, stream_new: int) -> dict[str, Any]:
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 1 << 26)])
    stub = pb_grpc.GenerationServiceStub(ch)
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    stop = threading.Event()
    calls: list[Any] = []
    failures: list[str] = []
    lock = threading.Lock()

    def stream(k: int) -> None:
        req = build_generate_request(
            PROMPTS[k % len(PROMPTS)], base_only=True, max_new_tokens=stream_new, ignore_eos=True
        )
        call = stub.GenerateStream(req)
        with lock:
            calls.append(call)
        n = 0
        try:
            for m in call:
                if m.generated_token_count > n:
                    n = m.generated_token_count
                    arrivals[k].append(time.perf_counter())
                if stop.is_set():
                    break
        except grpc.RpcError as e:
            if not stop.is_set():
                failures.append(f"stream {k}: {e.code().name}: {e.details()}")

    threads = [threading.Thread(target=stream, args=(k,), daemon=True) for k in range(streams)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    while min(len(a) for a in arrivals) < QUIET_TOKENS:
        if failures:
            raise RuntimeError("; ".join(failures))
        time.sleep(0.01)
    done_at: list[float] = []
    t_burst = time.perf_counter()

    def long_prompt(i: int) -> None:
        req = build_generate_request([464 + i] * prompt_len, base_only=True, max_new_tokens=2, ignore_eos=True)
        stub.Generate(req, timeout=1800)
        with lock:
            done_at.append(time.perf_counter())

    burst_threads = [threading.Thread(target=long_prompt, args=(i,)) for i in range(burst)]
    for t in burst_threads:
        t.start()
    for t in burst_threads:
        t.join()
    t_end = time.perf_counter()
    for t in threads:  # the streams run to their end: the same work in every setting
        t.join(timeout=1800)
    t_all = max([t_end] + [a[-1] for a in arrivals if a])
    stop.set()
    ch.close()

    quiet, during = [], []
    stream_tokens_in_burst = 0
    for a in arrivals:
        for i, (x, y) in enumerate(itertools.pairwise(a)):
            if y <= t_burst:
                if i >= SETTLE:
                    quiet.append(y - x)
            elif x < t_end:
                during.append(y - x)
        stream_tokens_in_burst += sum(1 for y in a if t_burst < y <= t_end)
    wall = t_end - t_burst
    processed = burst * (prompt_len + 2) + stream_tokens_in_burst
    q99 = pct(quiet, 99)
    return {
        "quiet_p50_ms": pct(quiet, 50) * 1e3,
        "quiet_p99_ms": q99 * 1e3,
        "burst_p50_ms": pct(during, 50) * 1e3,
        "burst_p99_ms": pct(during, 99) * 1e3,
        "burst_max_ms": max(during) * 1e3 if during else float("nan"),
        "max_over_quiet_p99": (max(during) / q99) if during and q99 > 0 else float("nan"),
        "burst_wall_s": wall,
        "stream_tokens_in_burst": stream_tokens_in_burst,
        "processed_tok_per_s": processed / wall,
        "workload_s": t_all - t_start,  # streams (stream_new tokens each) + the burst, start to last token
    }


def run_core(
    ens: Any, tokenizer: Any, budget: int | None, streams: int, burst: int, prompt_len: int, stream_new: int
) -> dict[str, Any]:
    """The same workload on the engine core in-process (EnsembleBatch, the embedded engine's session: one
    `logprobs(budget)` per step, greedy argmax), with no RPC, no client and no other thread on the cores:
    what chunking costs the model work alone."""
    batch = ens.new_batch()
    for k in range(streams):
        batch.add(("s", k), tokenizer(PROMPTS[k % len(PROMPTS)], add_special_tokens=False)["input_ids"])
    made: dict[Any, int] = {}
    gaps: list[float] = []  # step times (every running stream's inter-token gap) while the burst is in
    quiet: list[float] = []
    start = last = time.perf_counter()
    burst_at = QUIET_TOKENS
    step = 0
    while len(batch):
        in_burst = any(s[0] == "b" for s in batch.seq_ids + batch.prefilling)
        lp = batch.logprobs(budget)
        now = time.perf_counter()
        if SETTLE < step < burst_at:
            quiet.append(now - last)
        elif in_burst:
            gaps.append(now - last)
        last = now
        nxt = {}
        for s, t in zip(batch.seq_ids, lp.argmax(-1).tolist(), strict=True):
            made[s] = made.get(s, 0) + 1
            if made[s] >= (2 if s[0] == "b" else stream_new):
                batch.remove(s)
            else:
                nxt[s] = t
        batch.append(nxt)
        step += 1
        if step == burst_at:
            for j in range(burst):
                batch.add(("b", j), [(464 + j) % ens.vocab.size] * prompt_len)
        if not any(s[0] == "s" for s in batch.seq_ids + batch.prefilling):
            break
    while len(batch):  # the burst's stragglers
        lp = batch.logprobs(budget)
        for s in list(batch.seq_ids):
            made[s] = made.get(s, 0) + 1
            if made[s] >= 2:
                batch.remove(s)
        batch.append({s: 13 for s in batch.seq_ids})
    workload = time.perf_counter() - start
    qp99 = pct(quiet, 99) * 1000
    return {
        "quiet_p50_ms": pct(quiet, 50) * 1000,
        "quiet_p99_ms": qp99,
        "burst_p50_ms": pct(gaps, 50) * 1000,
        "burst_p99_ms": pct(gaps, 99) * 1000,
        "burst_max_ms": max(gaps) * 1000,
        "max_over_quiet_p99": max(gaps) * 1000 / qp99,
        "workload_s": workload,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=["demo", "smollm2"], default="smollm2")
    ap.add_argument("--chunks", default="none,64,128,256", help="prefill_chunk_tokens settings; none: unchunked")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=1536)
    ap.add_argument("--stream-new", type=int, default=160, help="tokens each stream generates")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--core", action="store_true", help="the engine core in-process instead of a server (no RPC, no client)"
    )
    args = ap.parse_args()
    if args.core:
        main_core(args)
        return

    from sensepack_testing.serve import server_process

    rows = []
    store_dir = tempfile.mkdtemp(prefix="sensepack-bench-store-")  # empty: the streams run the base model
    for chunk in args.chunks.split(","):
        value = None if chunk == "none" else int(chunk)
        cfg = {
            "model": model_section(args.profile),
            "server": {"metrics_port": -1, "warmup": True},
            "admin": {"token": "bench"},
            "store": {"uri": store_dir},
            "logging": {"level": "WARNING"},
            "limits": {
                "max_running": 64,
                "max_waiting": 256,
                "max_prompt_tokens": max(args.prompt_len, 64),
                "max_new_tokens": args.stream_new,
                "prefill_chunk_tokens": value,
            },
        }
        with server_process(cfg) as port:
            r = run_setting(port, args.streams, args.burst, args.prompt_len, args.stream_new)
        r["prefill_chunk_tokens"] = chunk
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in rows if r["prefill_chunk_tokens"] == "none"), rows[0])
    for r in rows:
        r["throughput_vs_unchunked"] = r["processed_tok_per_s"] / base["processed_tok_per_s"]
        r["workload_vs_unchunked"] = base["workload_s"] / r["workload_s"]  # same work: the throughput ratio
    out = {"command": " ".join(sys.argv), "machine": bench_machine(), "args": vars(args), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(
        "\n| prefill_chunk_tokens | quiet ITL p50 / p99 ms | burst ITL p50 / p99 / max ms | max / quiet p99 "
        "| burst wall s | processed tok/s | vs unchunked | whole workload s | vs unchunked |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['prefill_chunk_tokens']} | {r['quiet_p50_ms']:.0f} / {r['quiet_p99_ms']:.0f} | "
            f"{r['burst_p50_ms']:.0f} / {r['burst_p99_ms']:.0f} / {r['burst_max_ms']:.0f} | "
            f"{r['max_over_quiet_p99']:.1f} | {r['burst_wall_s']:.1f} | {r['processed_tok_per_s']:.0f} | "
            f"{r['throughput_vs_unchunked']:.3f} | {r['workload_s']:.1f} | {r['workload_vs_unchunked']:.3f} |"
        )


def main_core(args: argparse.Namespace) -> None:
    from serve.config import Config
    from serve.models import build_served

    served = build_served(
        Config.model_validate({"model": model_section(args.profile), "store": {"uri": "unused"}}).model
    )
    rows = []
    for chunk in args.chunks.split(","):
        r = run_core(
            served.ensemble,
            served.tokenizer,
            None if chunk == "none" else int(chunk),
            args.streams,
            args.burst,
            args.prompt_len,
            args.stream_new,
        )
        r["prefill_chunk_tokens"] = chunk
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in rows if r["prefill_chunk_tokens"] == "none"), rows[0])
    for r in rows:
        r["workload_vs_unchunked"] = base["workload_s"] / r["workload_s"]
    if args.json:
        out = {"command": " ".join(sys.argv), "machine": bench_machine(), "args": vars(args), "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(
        "\n| prefill_chunk_tokens (engine core) | quiet step p50 / p99 ms | burst step p50 / p99 / max ms "
        "| max / quiet p99 | whole workload s | vs unchunked |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['prefill_chunk_tokens']} | {r['quiet_p50_ms']:.0f} / {r['quiet_p99_ms']:.0f} | "
            f"{r['burst_p50_ms']:.0f} / {r['burst_p99_ms']:.0f} / {r['burst_max_ms']:.0f} | "
            f"{r['max_over_quiet_p99']:.1f} | {r['workload_s']:.1f} | {r['workload_vs_unchunked']:.3f} |"
        )


if __name__ == "__main__":
    main()
