"""Helpers for tests and benchmarks: a real server on 127.0.0.1 with a free
port, sharing one demo model per process, and packs published into a
temporary store.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from sensepack_testing import free_port
from serve.config import load_config
from serve.models import Served, build_served, pack_from_edits

_SERVED: dict[int, Served] = {}

TOKEN = "test-admin-token"


def demo_served(seed: int = 0) -> Served:
    """The demo models, built once per process."""
    if seed not in _SERVED:
        from serve.config import ModelConfig

        _SERVED[seed] = build_served(ModelConfig(profile="demo", demo_seed=seed))
    return _SERVED[seed]


def make_config(store_dir: str | Path, **overrides):
    base = {
        "server.port": 0,
        "server.metrics_port": 0,
        "server.grace_period_s": 5.0,
        "admin.token": TOKEN,
        "store.uri": str(store_dir),
        "store.poll_interval_s": 0.2,
        "ab.enabled": True,
        "logging.json": True,
        "packs.load_on_request": True,
    }
    base.update(overrides)
    return load_config(None, base)


@contextlib.contextmanager
def running_server(store_dir=None, served: Served | None = None, **overrides):
    from serve.server import SensepackServer

    tmp = None
    if store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sensepack-test-store-")
        store_dir = tmp.name
    cfg = make_config(store_dir, **overrides)
    server = SensepackServer(cfg, served=served or demo_served()).start()
    try:
        yield server
    finally:
        server.stop(grace=5.0)
        if tmp is not None:
            tmp.cleanup()


def channel(server) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{server.port}")


def auth(token: str = TOKEN):
    return [("authorization", f"Bearer {token}")]


def publish_edits(
    store,
    served: Served,
    name: str,
    edits,
    beta: float = 1.0,
    epsilon: float = 0.05,
    alias: str | None = None,
    training: dict | None = None,
) -> str:
    pack = pack_from_edits(name, edits, served, beta, epsilon, training=training)
    version = store.publish(pack)
    if alias:
        store.set_alias(name, alias, version)
    return version


def demo_variant(served: Served, target: str, strength: float = 12.0, trigger: str = " Mauritius"):
    """SenseEdits on the trigger's tokens pointing at `target` (ensemble.demo's construction)."""
    from ensemble.demo import demo_pack

    return demo_pack(served.backpack, served.tokenizer, trigger=trigger, target=target, strength=strength).edits


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric(samples: dict[str, float], name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, v in samples.items():
        n, _, rest = key.partition("{")
        if n != name:
            continue
        if all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total


def wait_until(cond, timeout: float = 30.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return cond()


@contextlib.contextmanager
def server_process(config: dict, timeout: float = 300.0, log_path: str | None = None, with_pid: bool = False):
    """`sensepack serve` in a separate process (benchmarks); yields the gRPC port once SERVING
    ((port, pid) with with_pid, e.g. to read the server's peak RSS)."""
    import os
    import subprocess
    import sys

    import yaml
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    cfg = dict(config)
    cfg.setdefault("server", {})
    cfg["server"] = {**cfg["server"], "port": port, "host": "127.0.0.1"}
    with tempfile.TemporaryDirectory(prefix="sensepack-bench-") as tmp, open(log_path or os.devnull, "w") as log:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "serve", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        try:
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            stub = health_pb2_grpc.HealthStub(ch)
            end = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode} (log: {log_path})")
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > end:
                    raise TimeoutError("server did not become SERVING")
                time.sleep(0.2)
            ch.close()
            yield (port, proc.pid) if with_pid else port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
