"""The benchmark suite behind `dqn-fast bench`."""

from __future__ import annotations

import json
import os
import time

from . import replay
from .timing import machine


def run(quick: bool = False, out_dir: str = "bench-results", train: bool = False) -> dict:
    started = time.time()
    results = {
        "machine": machine(),
        "quick": quick,
        "add": replay.bench_add(quick),
        "sample": replay.bench_sample(quick),
        "memory": replay.bench_memory(quick),
    }
    if train:  # needs the atari and sb3 extras
        from .train_speed import bench_train_speed

        results["train"] = bench_train_speed(quick)
    results["seconds"] = time.time() - started
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(format_table(results))
    print(f"\nresults: {path}")
    return results


def format_table(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"dqn_fast replay benchmark ({'quick' if r['quick'] else 'full'}) on {m.get('cpu', '?')}, "
        f"{m['cpu_count']} cores, {m.get('mem_total_gib', '?')} GiB; medians over interleaved repeats",
        "",
        "add (from Python, transitions/s)",
    ]
    for name, row in r["add"].items():
        lines.append(f"  {name:<16} {row['transitions_per_s']:>12,.0f}")
    lines += ["", "sample (84x84x4 uint8)      us/batch   batches/s   out GB/s   vs numpy take"]
    for batch, rows in r["sample"].items():
        for name, row in rows.items():
            lines.append(
                f"  {batch:<9} {name:<18} {row['us_per_batch']:>8.1f} {row['batches_per_s']:>10,.0f}"
                f" {row['output_gb_per_s']:>9.2f} {row['speedup_vs_numpy_take']:>10.2f}x"
            )
    mem = r["memory"]
    lines += [
        "",
        "memory (Atari, default sizing)",
        f"  nbytes per transition        {mem['nbytes_per_transition']:,.1f} B "
        f"(budget {mem['budget_bytes_per_transition']:,.1f} B)",
        f"  nbytes at 1M transitions     {mem['nbytes_1M_gb']:.2f} GB",
        f"  RSS growth filling {mem['filled_transitions']:,}: {mem['rss_growth_gb']:.2f} GB "
        f"(len {mem['len_after_fill']:,}; {mem['rss_growth_per_1M_gb']:.2f} GB per 1M)",
        f"  stacked arrays at 1M: obs only {mem['stacked_obs_only_1M_gb']:.1f} GB, "
        f"obs + next_obs {mem['stacked_obs_and_next_1M_gb']:.1f} GB (from array shapes)",
    ]
    if "train" in r:
        t = r["train"]
        lines += [
            "",
            f"Atari training ({t['env']}, learning phase, {t['timed_steps']} env steps), env steps/s",
            f"  dqn_fast            {t['dqn_fast']['steps_per_s']:>8.1f}  (replay + input: {100 * t['dqn_fast']['replay_share']:.2f}% of step time)",
            f"  CleanRL-style + SB3 {t['cleanrl_style_sb3']['steps_per_s']:>8.1f}",
            f"  speedup             {t['speedup']:>8.2f}x",
        ]
    return "\n".join(lines)
