"""The report's allocator-state, prioritized and n-step tables (text and Markdown).

Each figure is measured in two allocator states (bench/suite.py
ALLOCATOR_STATES); the headline is the ratio against the peer's better state,
and both states stay visible beside it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

STATES = ("default", "warm")
GOALS = {"per_vs_fastest_peer": 2.0, "per_over_uniform": 0.80, "nstep_vs_sb3": 3.0, "nstep_over_uniform": 0.85}


def better(by_state: dict, col: str) -> Tuple[Optional[dict], Optional[str]]:
    """The state in which the peer ran faster, and its figure."""
    figs = [(by_state[st][col], st) for st in STATES if st in by_state and col in by_state[st]]
    if not figs:
        return None, None
    return max(figs, key=lambda f: f[0]["per_s"])


def uniform_states(r: dict) -> dict:
    """{peer: {"default": atari rows, "warm": atari rows}} from the suite's two children."""
    suite = r["suite"]
    out = {}
    for name, row in suite["peers"].items():
        if "atari" not in row:
            continue
        out[name] = {"default": row["atari"]}
        warm = suite.get("peers_warm", {}).get(name, {})
        if "atari" in warm:
            out[name]["warm"] = warm["atari"]
    return out


def _fig(fig: dict, ours: bool = False) -> str:
    return f"{fig['per_s']:,.0f}" + ("" if ours or "dqn_fast_speedup" not in fig else f" ({fig['dqn_fast_speedup']:.1f}x)")


def _table(head: List[str], rows: List[List[str]], markdown: bool, width: int = 24) -> List[str]:
    if markdown:
        return ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|",
                *("| " + " | ".join(row) + " |" for row in rows)]
    return ["  " + f"{head[0]:<44}" + "".join(f"{h:>{width}}" for h in head[1:]),
            *("  " + f"{row[0]:<44}" + "".join(f"{c:>{width}}" for c in row[1:]) for row in rows)]


def allocator_lines(r: dict, markdown: bool = False) -> List[str]:
    states = uniform_states(r)
    if not any("warm" in v for v in states.values()):
        return []
    head = ["peer", "32 default", "32 warm", "32 headline", "256 default", "256 warm", "256 headline"]
    rows = []
    for name, by in states.items():
        ours = name == "dqn_fast"
        row = [name]
        for col in ("sample_32", "sample_256"):
            for st in STATES:
                row.append(_fig(by[st][col], ours) if st in by and col in by[st] else "-")
            fig, st = better(by, col)
            row.append("-" if fig is None else (f"{fig['per_s']:,.0f}" if ours else f"{fig['dqn_fast_speedup']:.1f}x ({st})"))
        rows.append(row)
    return ["", "Atari sampling, per second, in both allocator states (default glibc; warm: MALLOC_MMAP_THRESHOLD_="
            "33554432 MALLOC_TRIM_THRESHOLD_=67108864 in the child's environment). Headline: dqn_fast's ratio against "
            "the peer's better state", ""[:0], *_table(head, rows, markdown, 18)]


def _ours(r: dict) -> dict:
    return r["suite"].get("features", {}).get("ours", {})


def _peer_rows(kind: str, r: dict, markdown: bool) -> Tuple[List[List[str]], dict]:
    rows, best = [], {}
    for name, by in r["suite"].get("features", {}).get(kind, {}).items():
        status = by.get("missing") or next((by[st].get("unavailable") or by[st].get("error") for st in STATES
                                            if st in by and ("unavailable" in by[st] or "error" in by[st])), None)
        if status:  # results.json keeps the whole text
            rows.append([name, status if len(status) <= 240 else status[:237] + "..."] + [""] * 5)
            continue
        row = [name + ("" if by["default"].get("exactness", "exact") == "exact" else " *")]
        for col in ("sample_32", "sample_256"):
            for st in STATES:
                row.append(_fig(by[st][col]) if st in by and col in by[st] else "-")
            fig, st = better(by, col)
            speedup = fig.get("dqn_fast_speedup") if fig else None
            row.append("-" if speedup is None else f"{speedup:.1f}x ({st})")
            best.setdefault(col, {})[name] = (fig["per_s"], speedup)
        rows.append(row)
    return rows, best


def feature_lines(r: dict, markdown: bool = False) -> List[str]:
    f = r["suite"].get("features")
    if not f:
        return []
    cap = r["suite"]["sizes"].get("feature_capacity")
    lines: List[str] = []
    ours = _ours(r)
    head = ["peer", "32 default", "32 warm", "32 headline", "256 default", "256 warm", "256 headline"]
    for kind, title, goal_key, goal_text in (
            ("per", "Prioritized replay: sample(B) + update_priorities of the batch", "per_vs_fastest_peer",
             "fastest peer"),
            ("nstep", "n-step returns (n=3): sample(B)", "nstep_vs_sb3", "SB3 NStepReplayBuffer")):
        rows, best = _peer_rows(kind, r, markdown)
        lines += ["", f"{title}, Atari-shaped, buffers of {cap:,} filled one step per add; per second, "
                  "(Nx) = how many times faster dqn_fast was in the same window", ""[:0], *_table(head, rows, markdown, 18)]
        for col, b in (("sample_32", 32), ("sample_256", 256)):
            cands = best.get(col, {})
            if kind == "nstep":
                cands = {n: v for n, v in cands.items() if n.startswith("SB3")}
            if cands and all(v[1] is not None for v in cands.values()):
                name, (rate, speedup) = max(cands.items(), key=lambda kv: kv[1][0])
                ok = "met" if speedup >= GOALS[goal_key] else "NOT met"
                lines.append(f"  goal >= {GOALS[goal_key]:g}x the {goal_text} at batch {b}: {speedup:.2f}x against "
                             f"{name} ({rate:,.0f}/s in its better state): {ok}")
    lines += _ours_lines(ours, markdown)
    one_m = r["suite"].get("dqn_fast_alone", {}).get("prioritized")
    if one_m:
        if "sample_32" in one_m:
            lines.append("  at {:,} transitions: ".format(one_m["filled"]) + "; ".join(
                f"batch {b} prioritized {one_m[f'sample_{b}']['per_per_s']:,.0f}/s, uniform "
                f"{one_m[f'sample_{b}']['uniform_per_s']:,.0f}/s ({one_m[f'sample_{b}']['per_over_uniform']:.0%})"
                for b in (32, 256)) + f"; prioritized buffer RSS +{one_m['rss_growth_gb']:.2f} GB")
        else:
            lines.append(f"  at 1M transitions: {one_m.get('skipped') or one_m.get('unavailable')}")
    notes = [f"  * {n}: {by['default']['exactness']}" for kind in ("per", "nstep")
             for n, by in f.get(kind, {}).items() if "default" in by and by["default"].get("exactness", "exact") != "exact"]
    if notes:
        lines += ["", "Not exact (checked by tests/test_bench_peers.py):", *notes]
    return lines


def _ours_lines(ours: dict, markdown: bool) -> List[str]:
    if not ours:
        return []
    lines = ["", "dqn_fast in one window: uniform one-step sample_into, prioritized (sample + update) and n-step 3 "
             "(goals: prioritized >= 80%, n-step >= 85% of uniform)"]
    for st in STATES:
        o = ours.get(st)
        if not o:
            continue
        if "unavailable" in o or "error" in o:
            lines.append(f"  [{st}] {o.get('unavailable') or 'ERROR ' + o['error']}")
            continue
        for b in (32, 256):
            row = o[f"sample_{b}"]
            lines.append(f"  [{st}] batch {b}: uniform {row['uniform_per_s']:,.0f}/s, prioritized {row['per_per_s']:,.0f}/s "
                         f"({row['per_over_uniform']:.0%}, {'met' if row['per_over_uniform'] >= GOALS['per_over_uniform'] else 'NOT met'}), "
                         f"n-step {row['nstep_per_s']:,.0f}/s ({row['nstep_over_uniform']:.0%}, "
                         f"{'met' if row['nstep_over_uniform'] >= GOALS['nstep_over_uniform'] else 'NOT met'})")
        up = o.get("update", {})
        if up:
            lines.append(f"  [{st}] update_priorities: " + ", ".join(
                f"batches of {n}: {v['priorities_per_s']:,.0f} priorities/s" for n, v in up.items()))
    return lines
