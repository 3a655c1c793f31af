"""What the serve benchmarks share: nearest-rank percentiles and the machine record written beside results."""

from __future__ import annotations

import os
import platform
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
