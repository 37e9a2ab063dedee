"""Timing and machine facts for the benchmarks.

The machines this runs on are shared and noisy, so every figure is a median
over repeats, and competing candidates are interleaved within each repeat
(A, B, A, B, ...) so a burst of load elsewhere hits both alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List


def interleaved(candidates: Dict[str, Callable[[], None]], calls: int, repeats: int) -> Dict[str, List[float]]:
    """Seconds per call of each candidate, one figure per repeat.

    Each candidate runs `calls` times per repeat after one warm-up call.
    """
    for fn in candidates.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux), 0 when unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def machine() -> dict:
    import numpy as np

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info
