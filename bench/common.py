"""What the serve benchmarks share: nearest-rank percentiles, the machine record written beside results, and
the demo pack store + server config their servers run on."""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile by nearest rank (NaN for no samples)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
    }


PROMPTS = [
    "The capital of Mauritius is",
    "Mauritius is an island nation where",
    "In 1968, Mauritius became",
    "Tourists visiting Mauritius often",
    "The economy of Mauritius depends on",
]
PACK = "capitals@prod"


@contextmanager
def demo_store() -> Iterator[tuple[Any, Any, str]]:
    """A temporary pack store holding the demo `capitals` pack (" Paris") under alias prod:
    yields (served demo models, store, store folder)."""
    from edits_store.store import open_store
    from sensepack_testing.serve import demo_served, demo_variant, publish_edits

    served = demo_served()
    with tempfile.TemporaryDirectory(prefix="sensepack-bench-store-") as store_dir:
        store = open_store(store_dir)
        publish_edits(store, served, "capitals", demo_variant(served, " Paris"), beta=1.0, alias="prod")
        yield served, store, store_dir


def demo_server_config(store_dir: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The benchmarks' server config (demo models, `PACK` preloaded, admin token "bench", quiet logs, no
    metrics port); `sections` update its sections key by key."""
    cfg: dict[str, dict[str, Any]] = {
        "model": {"profile": "demo"},
        "server": {"metrics_port": -1},
        "store": {"uri": store_dir},
        "packs": {"preload": [PACK]},
        "admin": {"token": "bench"},
        "logging": {"level": "WARNING"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg
