"""The report: a text table and PNG plots from a results dict (results.json)."""

from __future__ import annotations

import os
from typing import List, Optional

from .report_features import allocator_lines, feature_lines

ATARI_COLUMNS = [("add_1env", "add 1 env/s"), ("add_8env", "add 8 envs/s"), ("sample_32", "sample 32/s"),
                 ("sample_256", "sample 256/s")]
VECTOR_COLUMNS = [("add_1env", "add 1 env/s"), ("sample_32", "sample 32/s"), ("sample_256", "sample 256/s")]


def _cell(fig: Optional[dict], ours: bool, gb_per_s: bool = False) -> str:
    if fig is None:
        return "-"
    if "not_applicable" in fig:
        return "n/a"
    text = f"{fig['per_s']:,.0f}"
    if gb_per_s and "out_gb_per_s" in fig:
        text += f" · {fig['out_gb_per_s']:.2f} GB/s"
    if not ours:
        text += f" ({fig['dqn_fast_speedup']:.1f}x)"
    return text


def _status(row: dict) -> Optional[str]:
    if "missing" in row:
        return row["missing"]
    if "error" in row:
        return "ERROR " + row["error"]
    return None


def format_table(r: dict) -> str:
    m = r["machine"]
    peers = r["suite"]["peers"]
    cap = r["suite"]["sizes"]["capacity"]
    lines = [
        f"dqn_fast replay benchmark ({'quick' if r['quick'] else 'full'}) on {m.get('cpu', '?')}, "
        f"{m['cpu_count']} cores, {m.get('mem_total_gib', '?')} GiB, Python {m['python']}",
        "Medians over interleaved repeats; (Nx) = how many times faster dqn_fast was in the same window.",
        "",
        f"Atari-shaped (84x84 uint8, stack 4), buffers of {cap:,}; sampling includes the conversion to torch tensors "
        "(default allocator; both states and the headline ratios: see the allocator table)",
    ]
    if r["quick"]:
        lines.insert(-1, "(--quick: buffers this small partly fit in CPU caches; quote the full run's figures)")
    head = f"  {'peer':<30}" + "".join(f"{title:>22}" for _, title in ATARI_COLUMNS) + f"{'B/transition':>14}{'RAM at 1M':>11}"
    lines += [head, "  " + "-" * (len(head) - 2)]
    notes: List[str] = []
    for name, row in peers.items():
        status = _status(row)
        if status:
            lines.append(f"  {name:<30}  {status}")
            continue
        a = row["atari"]
        ours = name.startswith("dqn_fast")
        cells = "".join(f"{_cell(a.get(col), ours):>22}" for col, _ in ATARI_COLUMNS)
        mem = a["memory"]
        lines.append(f"  {name:<30}{cells}{mem['rss_bytes_per_transition']:>14,.0f}{mem['projected_1M_gb']:>8.1f} GB")
        if row["exactness"] != "exact":
            notes.append(f"  {name}: {row['exactness']}")
    if notes:
        lines += ["", "Not exact (checked by tests/test_bench_peers.py):", *notes]

    lines += ["", f"CartPole-sized (4 float32), buffers of {r['suite']['sizes']['vector_capacity']:,}"]
    head = f"  {'peer':<30}" + "".join(f"{title:>22}" for _, title in VECTOR_COLUMNS)
    lines += [head, "  " + "-" * (len(head) - 2)]
    for name, row in peers.items():
        if _status(row):
            continue
        v = row["vector"]
        lines.append(f"  {name:<30}" + "".join(f"{_cell(v.get(col), name.startswith('dqn_fast')):>22}" for col, _ in VECTOR_COLUMNS))

    alone = r["suite"].get("dqn_fast_alone", {})
    ours = peers.get("dqn_fast", {}).get("atari")
    if "error" in alone:
        lines += ["", f"dqn_fast alone: ERROR {alone['error']}"]
    elif ours and "one_thread_per_s" in ours["sample_32"]:
        memcpy = alone["memcpy_gb_per_s"]
        lines += ["", "The physical limit on this machine, same run (one thread each)",
                  f"  memcpy (256 MB arrays)  {memcpy:6.2f} GB/s"]
        for b in (32, 256):
            row = ours[f"sample_{b}"]
            one, take = row["one_thread_out_gb_per_s"], row["numpy_take_out_gb_per_s"]
            lines.append(
                f"  batch {b:<3}: numpy gather of the same rows {take:5.2f} GB/s; dqn_fast on one sampling thread "
                f"{one:5.2f} GB/s = {one / memcpy:.0%} of memcpy, {one / take:.2f}x the gather "
                f"(default threads: {row['out_gb_per_s']:.2f} GB/s)")
        lines.append("  dqn_fast frame-window output (k+1 frames instead of 2k; obs, next_obs are views): "
                     + ", ".join(f"batch {b} {ours[f'sample_{b}']['window_per_s']:,.0f}/s" for b in (32, 256)))
        mem = alone["memory"]
        lines.append(f"  dqn_fast filled with {mem['filled']:,} transitions: RSS +{mem['rss_growth_gb']:.2f} GB "
                     f"({mem['rss_bytes_per_transition']:,.0f} B/transition; one frame is {mem['frame_bytes']:,} B)")
        pinned = alone.get("sample_into_pinned")
        if isinstance(pinned, str):
            lines.append(f"  sample_into a pinned tensor: {pinned}")
        for b in (32, 256):
            p = alone.get(f"sample_into_pinned_{b}")
            if p:
                lines.append(f"  sample_into pinned, batch {b}: {p['per_s']:,.0f}/s (pageable {p['pageable_per_s']:,.0f}/s)")
    lines += allocator_lines(r)
    lines += feature_lines(r)
    lines += _under_load_lines(r)
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


def _under_load_lines(r: dict, markdown: bool = False) -> List[str]:
    u = r["suite"].get("under_load")
    if not u:
        return []
    if "error" in u:
        return ["", f"dqn_fast under load: ERROR {u['error']}"]
    title = (f"dqn_fast sample_into, batches/s, buffers of {u['capacity']:,}: one sampling thread against the "
             f"default, quiet and with one core kept busy by a busy loop ({u['window_s']:g} s rounds, interleaved; "
             "in brackets: default / one thread, median of the per-round ratios)")
    head = ["batch", "quiet, 1 thread", "quiet, default", "one core busy, 1 thread", "one core busy, default"]
    rows = []
    for b in ("32", "256"):
        q, busy = u["quiet"][b], u["one_core_busy"][b]
        rows.append([b, f"{q['one_thread_per_s']:,.0f}", f"{q['default_per_s']:,.0f} ({q['default_over_one_thread']:.2f}x)",
                     f"{busy['one_thread_per_s']:,.0f}",
                     f"{busy['default_per_s']:,.0f} ({busy['default_over_one_thread']:.2f}x)"])
    if markdown:
        return ["", title, "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|",
                *("| " + " | ".join(row) + " |" for row in rows)]
    return ["", title, "  " + "".join(f"{h:>26}" for h in head),
            *("  " + "".join(f"{c:>26}" for c in row) for row in rows)]


def plot(r: dict, out_dir: str) -> List[str]:
    """throughput.png (bars per peer) and memory.png (GB per 1M transitions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    peers = {n: row for n, row in r["suite"]["peers"].items() if not _status(row)}
    names = list(peers)
    colors = ["#d62728" if n.startswith("dqn_fast") else "#7f7f7f" for n in names]
    m = r["machine"]
    where = f"{m.get('cpu', '?')}, {m['cpu_count']} cores; medians of interleaved repeats"
    paths = []

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), sharey=True, constrained_layout=True)
    panels = [("atari", c, f"Atari {t}") for c, t in ATARI_COLUMNS] + [("vector", c, f"CartPole-sized {t}")
                                                                          for c, t in VECTOR_COLUMNS[:2]]
    for ax, (workload, col, title) in zip(axes.flat, panels):
        values = []
        for n in names:
            fig_ = peers[n].get(workload, {}).get(col)
            values.append(fig_["per_s"] if fig_ and "per_s" in fig_ else 0.0)
        ax.barh(names, values, color=colors)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if any(v > 0 for v in values):
            ax.set_xlim(min(v for v in values if v > 0) / 3, max(values) * 8)
        ax.set_title(title)
        for y, v in enumerate(values):
            if v > 0:
                ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
            else:
                ax.text(0.01, y, "n/a", va="center", fontsize=8, transform=ax.get_yaxis_transform())
    axes.flat[0].invert_yaxis()  # shared: once
    fig.suptitle(f"Replay throughput per second (higher is better) — {where}")
    paths.append(os.path.join(out_dir, "throughput.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.8), constrained_layout=True)
    values = [peers[n]["atari"]["memory"]["projected_1M_gb"] for n in names]
    ax.barh(names, values, color=colors)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values + [1.0]) * 1.15)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,.1f} GB", va="center", fontsize=8)
    alone = r["suite"].get("dqn_fast_alone", {}).get("memory")
    if alone and alone["filled"] >= 1_000_000:
        ax.axvline(alone["rss_growth_gb"], color="#d62728", ls="--", lw=1)
        ax.text(alone["rss_growth_gb"], len(names) - 0.5, f" dqn_fast measured at 1M: {alone['rss_growth_gb']:.1f} GB",
                color="#d62728", fontsize=8, va="bottom")
    if m.get("mem_total_gib"):
        ax.axvline(m["mem_total_gib"] * 2**30 / 1e9, color="k", ls=":", lw=1)
    ax.set_xlabel("GB of RAM for 1M Atari transitions (RSS growth per transition x 1M; dotted: this machine's RAM)")
    ax.set_title(f"Memory per 1M transitions (lower is better) — filled {r['suite']['sizes']['capacity']:,} each")
    paths.append(os.path.join(out_dir, "memory.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def markdown(r: dict) -> str:
    """The Atari and CartPole-sized tables as Markdown (what the README shows)."""
    peers = r["suite"]["peers"]
    cap = r["suite"]["sizes"]["capacity"]

    out = [f"Atari-shaped, buffers of {cap:,} (per second; in brackets: how many times faster dqn_fast was "
           "in the same interleaved window; default allocator, both states in the allocator table below)", "",
           "| peer | add, 1 env | add, 8 envs | sample 32 | sample 256 | bytes / transition: RSS (arrays) | RAM at 1M |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in peers.items():
        status = _status(row)
        if status:
            out.append(f"| {name} | {status} ||||||")
            continue
        a, ours = row["atari"], name == "dqn_fast"
        mem = a["memory"]
        label = f"**{name}**" if ours else name + ("" if row["exactness"] == "exact" else " \\*")
        out.append(f"| {label} | " + " | ".join(_cell(a.get(c), ours, gb_per_s=True) for c, _ in ATARI_COLUMNS)
                   + f" | {mem['rss_bytes_per_transition']:,.0f}"
                   + ("" if mem["storage_bytes_per_transition"] is None else f" ({mem['storage_bytes_per_transition']:,.0f})")
                   + f" | {mem['projected_1M_gb']:.1f} GB |")
    out += ["", f"CartPole-sized (4 float32), buffers of {r['suite']['sizes']['vector_capacity']:,}", "",
            "| peer | add, 1 env | sample 32 | sample 256 |", "|---|---:|---:|---:|"]
    for name, row in peers.items():
        if _status(row):
            continue
        v, ours = row["vector"], name == "dqn_fast"
        out.append(f"| {'**' + name + '**' if ours else name} | "
                   + " | ".join(_cell(v.get(c), ours, gb_per_s=True) for c, _ in VECTOR_COLUMNS) + " |")
    out += allocator_lines(r, markdown=True)
    out += feature_lines(r, markdown=True)
    out += _under_load_lines(r, markdown=True)
    return "\n".join(out) + "\n"
