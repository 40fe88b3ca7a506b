"""Shared pieces of the benchmarks: a kernel to measure, percentiles, and bench/results.json."""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from kernel.testing import KernelProc

RESULTS = Path(__file__).resolve().parent / "results.json"
# The benchmarks' kernels keep the assembled model in the repository's .state, as the tests' do.
os.environ.setdefault("AIOSD_STATE_DIR", str(Path(__file__).resolve().parent.parent / ".state"))


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values`` (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def start_kernel(config: str | None = None) -> KernelProc:
    """A real kernel on the real model in a temporary runtime dir (``.stop()`` it when done)."""
    tmp = Path(tempfile.mkdtemp(prefix="aiosd-bench-"))
    return KernelProc(tmp) if config is None else KernelProc(tmp, config)


def save(section: str, data: dict) -> None:
    """Merge ``data`` into bench/results.json under ``section``."""
    try:
        results = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        results = {}
    results[section] = dict(data, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
