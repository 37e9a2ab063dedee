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


def interleaved(rounds: Dict[str, Callable[[], float]], repeats: int, warmup: int = 2) -> Dict[str, List[float]]:
    """Each candidate runs one timed round per repeat and returns its rate;
    rounds alternate A, B, C, A, B, C, ... Warm-up rounds come first, also
    alternating: peers that allocate per call slow down or speed up for a few
    rounds while the allocator settles (glibc's mmap threshold adapts)."""
    for _ in range(warmup):
        for fn in rounds.values():
            fn()
    rates: Dict[str, List[float]] = {name: [] for name in rounds}
    for _ in range(repeats):
        for name, fn in rounds.items():
            rates[name].append(fn())
    return rates


def block_rate(block: Callable[[], None], per_block: int, min_s: float) -> float:
    """Operations per second: `block` (doing `per_block` operations) runs until
    at least `min_s` seconds have passed. A round of a few milliseconds
    measures the start, not the steady state a trainer sees: a sampler's
    threads waking, and whatever the round before left behind (a torch peer's
    OpenMP threads still spinning)."""
    n, start = 0, time.perf_counter()
    while True:
        block()
        n += per_block
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return n / elapsed


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


def versions() -> dict:
    """Installed versions of this project and every peer ("missing" when absent)."""
    from importlib import metadata

    out = {}
    for dist in ("dqn-fast", "numpy", "torch", "stable-baselines3", "cpprb", "torchrl", "tensordict", "tianshou",
                 "gymnasium", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out
