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
    override = dict(sizes_override or {})
    compression_override = override.pop("compression", None) or {}
    results = {"machine": machine(), "versions": versions(), "quick": quick,
               "suite": suite.run_suite(quick, only, log=lambda s: print(s, flush=True), sizes_override=override)}
    if _runs_compression(only):  # real Atari frames: needs ale-py (the atari extra)
        from . import compression

        cs = {**compression.sizes(quick), "out_dir": out_dir, **compression_override}
        results["compression"] = compression.run_compression(cs, suite.in_child, suite.ALLOCATOR_STATES,
                                                             log=lambda s: print(s, flush=True), only=only)
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
        if "compression" in results:
            from . import report_compression

            f.write(report_compression.markdown(results))
    print()
    print(report.format_table(results))
    if "compression" in results:
        from . import report_compression

        print(report_compression.format_table(results))
    try:
        plots = report.plot(results, out_dir)
        if "compression" in results:
            plots += report_compression.plot(results, out_dir)
    except ImportError:
        plots = []
        print("\nplots skipped: matplotlib is not installed (pip install 'dqn-fast[bench]')")
    print(f"\nresults: {path}, tables: {os.path.join(out_dir, 'report.md')}" + "".join(f"\nplot: {p}" for p in plots))
    print(f"({results['seconds']:.0f} s)")
    return results


def _runs_compression(only: Optional[list]) -> bool:
    """The compression benchmark runs with every peer, or when `only` names
    one of its own rows (bench/compression.py NAMES, or a compressed peer
    that the side-by-side suite does not have)."""
    if only is None:
        return True
    from .compression import NAMES
    from .peers import BY_NAME as SUITE_PEERS
    from .peers_compression import BY_NAME as COMPRESSION_PEERS

    own = set(NAMES) | (set(COMPRESSION_PEERS) - set(SUITE_PEERS))
    return any(name in own for name in only)
