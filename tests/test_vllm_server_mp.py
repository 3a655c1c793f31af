"""The gRPC server with `engine: vllm` in multi-process mode, end to end, as an operator runs it.

`sensepack serve` runs in a subprocess with vLLM's engine core (and its worker) in a process of its own;
the processor in the worker loads the Backpack folder and the pinned pack from the edits store. Checked:

* Generate with a pack equals the embedded decode, token for token; base-only too;
* the processor's metrics, which live in the worker, reach the server's /metrics (Backpack time per
  step, exact-skip row-steps) through vLLM's collective_rpc (serve.vllm.worker);
* killing the engine-core process: health goes NOT_SERVING, running streams end UNAVAILABLE (none
  INTERNAL), and the server process exits with code 3 for its orchestrator to restart it.

Skipped where vLLM is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from tests.vllm_gate import require_vllm

require_vllm(in_process=False)

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from edits_store.store import open_store  # noqa: E402
from ensemble.demo import demo_pack, tiny_backpack  # noqa: E402
from ensemble.edits import PackRef  # noqa: E402
from ensemble.tokenizer import load_tokenizer  # noqa: E402
from sensepack_testing.serve import metric, parse_metrics, publish_edits  # noqa: E402
from sensepack_testing.vllm import save_tiny_gptj  # noqa: E402
from serve.client import Client  # noqa: E402
from serve.config import ModelConfig  # noqa: E402
from serve.models import build_served  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EDITED = "The capital of Mauritius is"  # carries the demo pack's edited token
GATE_CORPUS = ROOT / "tests" / "fixtures" / "gate_mauritius.txt"  # texts with and without the edited token
PLAIN = "The weather today is"  # no edited token: exact skip


def _engine_core_pids(pid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp-server")
    save_tiny_gptj(tmp / "gptj", seed=0)
    bp = tiny_backpack(0)
    bp.save_pretrained(tmp / "backpack")
    model_cfg = ModelConfig(profile="pretrained", large_model=str(tmp / "gptj"), backpack=str(tmp / "backpack"))
    served = build_served(model_cfg)  # what the server process loads, for fingerprints
    store = open_store(str(tmp / "store"))
    pack = demo_pack(served.ensemble.backpack, load_tokenizer())
    version = publish_edits(store, served, "capitals", pack.edits, beta=1.0, alias="prod")
    cfg = {
        "engine": "vllm",
        "model": model_cfg.model_dump(mode="json"),
        "store": {"uri": str(tmp / "store"), "subscribe": False},
        "server": {"port": 0, "metrics_port": 0, "warmup": True, "grace_period_s": 5},
        "admin": {"token": "mp-test-token"},
        "limits": {"max_prompt_tokens": 32, "max_new_tokens": 200, "max_running": 8},
        "packs": {"preload": ["capitals@prod"]},
        # the gate measures the preloaded pack through vLLM: the worker reads it from the store
        "gate": {"enabled": True, "epsilon": 100.0, "max_texts": 8, "corpus": str(GATE_CORPUS)},
        "ab": {"enabled": False},
        "vllm": {"model": str(tmp / "gptj"), "multiprocessing": True, "enforce_eager": True, "max_model_len": 256},
    }
    (tmp / "server.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
    )
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "serve", "--config", str(tmp / "server.yaml")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "sensepack serving on" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + 600
    while not ready.wait(1) and proc.poll() is None and time.monotonic() < end:
        pass
    if not ready.is_set():
        proc.kill()
        pytest.fail("server did not start:\n" + "".join(lines[-60:]))
    text = "".join(lines)
    port, metrics_url = re.search(r"serving on [^:]+:(\d+)", text), re.search(r"metrics on (http://\S+/metrics)", text)
    yield dict(
        proc=proc,
        port=int(port.group(1)),
        metrics_url=metrics_url.group(1),
        served=served,
        version=version,
        lines=lines,
        pack_ref=PackRef("capitals", version, pack.edits, 1.0),
    )
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse_metrics(r.read().decode())


def test_generate_with_a_pack_and_worker_metrics(server):
    tok, ens = server["served"].tokenizer, server["served"].ensemble
    c = Client(f"127.0.0.1:{server['port']}")
    n = 10
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in (EDITED, PLAIN)]
    ref = ens.generate_greedy(ids, [[server["pack_ref"]]] * 2, n)
    base = ens.generate_greedy(ids[:1], [[]], n)[0]
    assert ref[0] != base  # the pack matters
    for prompt, want in zip((EDITED, PLAIN), ref, strict=True):
        r = c.generate(prompt, packs=["capitals@prod"], max_new_tokens=n, ignore_eos=True, tokens=True)
        assert [t.id for t in r.tokens] == want
        assert [(u.name, u.version) for u in r.packs] == [("capitals", server["version"])]
    r = c.generate(EDITED, base_only=True, max_new_tokens=n, ignore_eos=True, tokens=True)
    assert [t.id for t in r.tokens] == base
    # the processor ran in the worker process; its counters reached this server's /metrics
    samples = _scrape(server["metrics_url"])
    assert metric(samples, "sensepack_backpack_step_seconds_count") > 0
    assert metric(samples, "sensepack_backpack_step_seconds_sum") > 0
    assert metric(samples, "sensepack_exact_skip_steps_total") > 0
    assert _engine_core_pids(server["proc"].pid)  # multi-process: vLLM's engine core is a child


def test_score_and_gate_through_the_worker_processes(server):
    """Score and the activation gate ran as forced-scoring requests in vLLM's worker process (records back
    through collective_rpc): equal to the embedded ensemble's numbers, float32 rounding apart."""
    from serve.abtest import Gate
    from serve.config import GateConfig

    tok, ens, pack = server["served"].tokenizer, server["served"].ensemble, server["pack_ref"]
    c = Client(f"127.0.0.1:{server['port']}")
    prefix = tok(EDITED, add_special_tokens=False)["input_ids"]
    conts = [tok(t, add_special_tokens=False)["input_ids"] for t in (" Port Louis, by the sea", " Paris")]
    r = c.score(prefix, conts, packs=["capitals@prod"], include_base=True)
    for k, cont in enumerate(conts):
        base, packed = ens.score([prefix], [cont], [[]])[0], ens.score([prefix], [cont], [[pack]])[0]
        assert list(r.continuations[k].base.token_logprobs) == pytest.approx(base.double().tolist(), abs=2e-5)
        assert list(r.continuations[k].packed.token_logprobs) == pytest.approx(packed.double().tolist(), abs=2e-5)
    rows = Gate(None, tok, GateConfig(corpus=GATE_CORPUS, max_texts=8)).rows  # the rows the server's gate scored
    a, b = ens.paired_nll(rows, [pack])
    got = metric(
        _scrape(server["metrics_url"]), "sensepack_gate_ball_ratio", pack="capitals", version=server["version"]
    )
    assert got == pytest.approx(sum(b) / sum(a), rel=1e-5)
    assert abs(got - 1.0) > 1e-3  # the corpus carries the edited token


def test_engine_core_death_is_seen(server):
    """Kill vLLM's engine core mid-generation: NOT_SERVING, streams end UNAVAILABLE, the process exits 3."""
    import signal

    proc = server["proc"]
    ch = grpc.insecure_channel(f"127.0.0.1:{server['port']}")
    watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
    seen = [next(watch).status]
    assert seen == [health_pb2.HealthCheckResponse.SERVING]

    def follow():
        try:
            for msg in watch:
                seen.append(msg.status)
        except grpc.RpcError:
            pass

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    c = Client(f"127.0.0.1:{server['port']}")
    streams = [
        c.stream(EDITED if i % 2 else PLAIN, packs=["capitals@prod"], max_new_tokens=200, ignore_eos=True)
        for i in range(4)
    ]
    for s in streams:
        next(s)  # admitted
    codes: list = [None] * len(streams)

    def drain(i):
        try:
            for _ in streams[i]:
                pass
            codes[i] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            codes[i] = e.code()

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    (core,) = _engine_core_pids(proc.pid)
    os.kill(core, signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert proc.wait(180) == 3, "".join(server["lines"][-40:])
    watcher.join(30)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
    assert grpc.StatusCode.INTERNAL not in codes
    assert grpc.StatusCode.UNAVAILABLE in codes
    assert all(code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK) for code in codes), codes
    assert any("engine_dead" in line for line in server["lines"])
