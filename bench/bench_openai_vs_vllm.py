"""sensepack's OpenAI-compatible API against vLLM's own OpenAI server on the same model folder, with the same
client load, side by side in one run: output tokens/s and time to first token at 1 and 8 concurrent streaming
clients, without a pack and (sensepack) with one.

    .venv/bin/python bench/bench_openai_vs_vllm.py [--requests 16] [--new 64] [--concurrency 1,8] [--json out.json]

Servers, each started here on loopback in turn, on SmolLM2-135M-Instruct (the zoo's cached folder):

* ``vllm``: ``vllm serve <folder>`` from .venv-vllm (`make test-vllm` builds it; skipped when absent),
* ``sensepack-vllm``: sensepack with ``engine: vllm`` on the same folder (a random stand-alone Backpack on
  SmolLM2's vocabulary: vLLM's processors see logits only, so no sense head) — its cost against plain vLLM
  without a pack is the processor's,
* ``sensepack``: sensepack's embedded engine with the sense head (the default SmolLM2 pairing).

The client is the `openai` package (streaming completions, ``ignore_eos``, greedy); TTFT is the time to the
first streamed token, tokens/s the output tokens of all requests over the wall time of the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench.common import PROMPTS, pct
from bench.common import machine as bench_machine

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("server did not come up")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def load(
    port: int, model: str, concurrency: int, requests: int, new: int, extra: dict[str, Any]
) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    ttft: list[float] = []
    tokens = [0]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            t0 = time.perf_counter()
            first = None
            stream = await client.completions.create(
                model=model,
                prompt=PROMPTS[i % len(PROMPTS)],
                max_tokens=new,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, **extra},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    tokens[0] += chunk.usage.completion_tokens
            ttft.append(first if first is not None else float("nan"))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return {
        "concurrency": concurrency,
        "tok_per_s": tokens[0] / wall,
        "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p99_ms": pct(ttft, 99) * 1e3,
        "tokens": tokens[0],
        "wall_s": wall,
    }


def random_backpack(tmp: str) -> str:
    """A small random Backpack on SmolLM2's vocabulary: engine: vllm serves stand-alone Backpacks only, and
    without a pack the processor's cost does not depend on its weights (backpack-smollm2 takes an hour to train)."""
    import torch

    from ensemble.backpack import BackpackConfig, BackpackLM

    folder = Path(tmp) / "backpack"
    if not folder.exists():
        torch.manual_seed(0)
        BackpackLM(BackpackConfig.tiny(vocab_size=49152, n_positions=2048)).save_pretrained(folder)
    return str(folder)


def sensepack_server(engine: str, folder: str, port: int, tmp: str) -> subprocess.Popen[bytes]:
    model: dict[str, Any] = {
        "profile": "pretrained",
        "large_model": "smollm2-135m-instruct",
        "tokenizer": "smollm2-135m-instruct",
        "backpack": "sense-smollm2" if engine == "embedded" else random_backpack(tmp),
    }
    cfg: dict[str, Any] = {
        "model": model,
        "server": {"port": free_port(), "metrics_port": -1},
        "http": {"enabled": True, "port": port, "served_model_name": "smollm2"},
        "store": {"uri": "capitals-smollm2" if engine == "embedded" else str(Path(tmp) / "store")},
        "packs": {"preload": ["capitals@prod"] if engine == "embedded" else []},
        "admin": {"token": "bench"},
        "logging": {"level": "WARNING"},
        "limits": {"max_running": 32, "max_waiting": 64},
    }
    python = sys.executable
    if engine == "vllm":
        cfg["engine"] = "vllm"
        cfg["vllm"] = {"model": folder, "enforce_eager": True, "max_model_len": 2048, "multiprocessing": False}
        python = str(VLLM_PY)
    path = Path(tmp) / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen(
        [python, "-m", "serve.cli", "serve", "--config", str(path)],
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    )


def vllm_server(folder: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", str(port),
         "--served-model-name", "smollm2", "--max-model-len", "2048", "--enforce-eager"],
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--servers", default="vllm,sensepack-vllm,sensepack")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from ensemble import zoo

    folder = str(zoo.resolve(zoo.SMOLLM2_NAME))
    rows = []
    with tempfile.TemporaryDirectory(prefix="sensepack-bench-") as tmp:
        for name in args.servers.split(","):
            if name != "sensepack" and not VLLM_PY.exists():
                print(f"skipping {name}: no .venv-vllm (make test-vllm builds it)", flush=True)
                continue
            port = free_port()
            if name == "vllm":
                proc = vllm_server(folder, port)
            else:
                proc = sensepack_server("vllm" if name == "sensepack-vllm" else "embedded", folder, port, tmp)
            try:
                wait_http(port, proc)
                asyncio.run(load(port, "smollm2", 1, 2, 8, {}))  # warm-up
                modes: list[tuple[str, str, dict[str, Any]]] = [("no pack", "smollm2", {})]
                if name == "sensepack":
                    modes.append(("pack", "smollm2", {"packs": ["capitals@prod"]}))
                for mode, model, extra in modes:
                    for c in (int(x) for x in args.concurrency.split(",")):
                        r = asyncio.run(load(port, model, c, args.requests, args.new, extra))
                        r.update(server=name, mode=mode)
                        rows.append(r)
                        print(json.dumps(r), flush=True)
            finally:
                stop(proc)
    base = {(r["concurrency"]): r["tok_per_s"] for r in rows if r["server"] == "vllm"}
    print("\n| server | mode | clients | tok/s | vs vLLM | TTFT p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["tok_per_s"] / base[r["concurrency"]] if r["concurrency"] in base else float("nan")
        r["vs_vllm"] = ratio
        print(
            f"| {r['server']} | {r['mode']} | {r['concurrency']} | {r['tok_per_s']:.1f} | {ratio:.3f} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} |"
        )
    if args.json:
        out = {"command": " ".join(sys.argv), "machine": bench_machine(), "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
