"""The live A/B monitor's per-sample cost as samples accumulate: the time of
`LiveMonitor.record` (streaming paired moments, the interval, the metrics)
around 1k, 10k, 100k and 1M recorded samples. Before the streaming statistics
it kept every sample and rescanned them (29 ms per sample at 100k, 379 ms at 1M).

    .venv/bin/python bench/bench_ab_monitor.py [--max 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble.edits import SenseEdits
from serve.abtest import LiveMonitor
from serve.config import ABConfig
from serve.metrics import Metrics
from serve.pack_cache import Resident


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max", type=int, default=1_000_000)
    ap.add_argument("--probe", type=int, default=2000, help="samples timed at each checkpoint")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    mon = LiveMonitor(ABConfig(min_samples=10**9), Metrics(), None)  # never breaches: every sample counts
    r = Resident("p", "v1", SenseEdits.empty(8), 1.0, 0.05)
    rng = random.Random(0)
    rows, n = [], 0
    checkpoints = [c for c in (1_000, 10_000, 100_000, 1_000_000, 10_000_000) if c <= args.max]
    for c in checkpoints:
        while n < c - args.probe:
            a = 50 + rng.random()
            mon.record(r, a, a * 1.01, 10)
            n += 1
        t0 = time.perf_counter()
        for _ in range(args.probe):
            a = 50 + rng.random()
            mon.record(r, a, a * 1.01, 10)
        dt = (time.perf_counter() - t0) / args.probe
        n += args.probe
        rows.append({"samples": n, "us_per_sample": round(dt * 1e6, 2)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"python": platform.python_version(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
