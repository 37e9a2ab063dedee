"""The benchmark suite behind `dqn-fast bench`: this project's replay buffer
side by side with the buffers people use (bench/peers.py), measured by
bench/suite.py, reported by bench/report.py."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from .timing import machine, versions


def run(quick: bool = False, out_dir: str = "bench-results", train: bool = False, only: Optional[list] = None,
        sizes_override: Optional[dict] = None) -> dict:
    from . import report, suite

    started = time.time()
    print(f"dqn-fast bench ({'quick' if quick else 'full'}): one child process per peer", flush=True)
    results = {"machine": machine(), "versions": versions(), "quick": quick,
               "suite": suite.run_suite(quick, only, log=lambda s: print(s, flush=True), sizes_override=sizes_override)}
    if train:  # needs the atari and sb3 extras
        from .train_speed import bench_train_speed

        results["train"] = bench_train_speed(quick)
    results["seconds"] = time.time() - started
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report.markdown(results))
    print()
    print(report.format_table(results))
    try:
        plots = report.plot(results, out_dir)
    except ImportError:
        plots = []
        print("\nplots skipped: matplotlib is not installed (pip install 'dqn-fast[bench]')")
    print(f"\nresults: {path}, tables: {os.path.join(out_dir, 'report.md')}" + "".join(f"\nplot: {p}" for p in plots))
    print(f"({results['seconds']:.0f} s)")
    return results
