"""The compression benchmark's report (bench/compression.py): a table per
game (text and Markdown), the goals of issue #11, and compression.png
(memory against sampling speed, one panel per game).

`r` is a results dict holding the benchmark's output under "compression"
(what `dqn-fast bench` and `python -m dqn_fast.bench.compression` write),
or that output itself.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from . import peers_compression as C

STATES = ("default", "warm")
HEAD = ["peer / config", "B/transition RSS", "payload B/transition", "sample 32/s", "sample 256/s", "add 1 env/s",
        "add 8 envs/s"]


def _c(r: dict) -> dict:
    return r.get("compression", r)


def _status(by_state: dict) -> Optional[str]:
    if "missing" in by_state:
        return by_state["missing"]
    for st in STATES:
        row = by_state.get(st, {})
        if "unavailable" in row:
            return row["unavailable"]
        if "error" in row:
            return "ERROR " + row["error"]
    return None


def _game_row(by_state: dict, state: str, game: str) -> dict:
    return by_state.get(state, {}).get("games", {}).get(game, {})


def better(by_state: dict, game: str, col: str) -> Tuple[Optional[str], Optional[dict]]:
    """The allocator state in which the peer sampled faster, and its figure."""
    figs = [(st, _game_row(by_state, st, game)[col]) for st in STATES if col in _game_row(by_state, st, game)]
    return max(figs, key=lambda f: f[1]["per_s"]) if figs else (None, None)


def _n(x: Optional[float], digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _sample_cell(by_state: dict, game: str, col: str, ours: bool) -> str:
    st, fig = better(by_state, game, col)
    if fig is None:
        return "-"
    text = f"{fig['per_s']:,.0f}"
    if ours and "window_per_s" in fig:
        text += f" · window {fig['window_per_s']:,.0f}"
    beside = fig.get("beside", {})
    if beside:
        text += " (" + " / ".join(f"{beside[b.name]['speedup']:.1f}x" for b in C.COMPRESSED_OURS if b.name in beside) + ")"
    if len([s for s in STATES if col in _game_row(by_state, s, game)]) > 1:
        text += f" [{st}]"
    return text


def _payload_cell(mem: dict) -> str:
    cap = mem["capacity"]
    if mem.get("nbytes") is not None:  # dqn_fast
        text = f"nbytes {mem['nbytes'] / cap:,.0f}"
        if mem.get("compression") and mem.get("frame_memory_used") is not None:
            text += f" · arena {mem['frame_memory_used'] / cap:,.0f} of {mem['frame_memory'] / cap:,.0f}"
        return text
    return _n(mem.get("payload_bytes_per_transition"))


def game_rows(r: dict, game: str, markdown: bool = False) -> List[List[str]]:
    c = _c(r)
    rows = []
    for name, by in c.get("peers", {}).items():
        status = _status(by)
        if status:
            rows.append([name, status if len(status) <= 160 else status[:157] + "..."] + [""] * 5)
            continue
        d = _game_row(by, "default", game)
        if "error" in d:
            rows.append([name, "ERROR " + d["error"]] + [""] * 5)
            continue
        if "memory" not in d:
            rows.append([name, "-"] + [""] * 5)
            continue
        ours = name in {cls.name for cls in C.OURS}
        mem = d["memory"]
        exact = by.get("default", {}).get("exactness", "exact") == "exact"
        label = (f"**{name}**" if ours and markdown else name + ("" if exact else " *"))
        add1 = d.get("add_1env")
        add1_text = "-" if add1 is None else f"{add1['per_s']:,.0f}" + "".join(
            f" ({v['speedup']:.1f}x)" for v in add1.get("beside", {}).values())
        add8 = d.get("add_8env")
        add8_text = "-" if add8 is None else f"{add8['per_s']:,.0f} ({add8['over_1env']:.2f}x of 1 env)"
        fill = "" if mem.get("len") in (None, mem["capacity"]) else f" (holds {mem['len']:,})"
        rows.append([label, f"{mem['rss_bytes_per_transition']:,.0f}{fill}", _payload_cell(mem),
                     _sample_cell(by, game, "sample_32", ours), _sample_cell(by, game, "sample_256", ours),
                     add1_text, add8_text])
    return rows


def _table(head: List[str], rows: List[List[str]], markdown: bool) -> List[str]:
    if markdown:
        return ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|",
                *("| " + " | ".join(row) + " |" for row in rows)]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  " + "  ".join(f"{str(c):<{w}}" if i == 0 else f"{str(c):>{w}}"  # noqa: E731
                                       for i, (c, w) in enumerate(zip(row, widths)))
    return [fmt(head), "  " + "-" * (sum(widths) + 2 * (len(widths) - 1)), *(fmt(row) for row in rows)]


def _goal_text(g: dict) -> str:
    what = f"({g['goal']}) {g['config']}: {g['what']}"
    if g["met"] is None:
        return f"  {what}: not measured" + (f" ({g['note']})" if g.get("note") else "")
    v = g["value"]
    if g["goal"] == "a":
        value = f"{v:,.0f} (max {g['max']:,.0f})"
    elif g["goal"] == "b":
        value = f"{v:.0%}"
    elif g["goal"] == "c" and "8 envs" not in g["what"]:
        value = f"{v:,.0f}"
    elif g["goal"] == "e":
        value = f"{v:.2f} GB"
    else:
        value = f"{v:.2f}x"
    per_game = g.get("game_values") or {}
    detail = ""
    if per_game and g["goal"] in "abcd":
        fmt = {"a": "{:,.0f}", "b": "{:.0%}", "c": "{:,.0f}" if "8 envs" not in g["what"] else "{:.2f}x",
               "d": "{:.1f}x"}[g["goal"]]
        detail = "; " + ", ".join(f"{k} " + fmt.format(x) for k, x in per_game.items())
        if g.get("best_peer"):
            detail += "; best peer: " + ", ".join(f"{k} {p}" for k, p in g["best_peer"].items())
    return f"  {what}: {value}, goal {g['threshold']}: {'met' if g['met'] else 'NOT met'}{detail}"


def _ratio_lines(c: dict, markdown: bool) -> List[str]:
    lines = []
    for st in STATES:
        rr = c.get("ratio", {}).get(st)
        if not rr:
            continue
        if "games" not in rr:
            lines += ["", f"dqn_fast compressed / uncompressed [{st}]: "
                      + (rr.get("unavailable") or rr.get("skipped") or "ERROR " + str(rr.get("error")))]
            continue
        head = ["game", "config"] + [f"{m} {b}/s" for b in (32, 256) for m in ("sample_into", "window")]
        rows = []
        for game, row in rr["games"].items():
            if "skipped" in row or "error" in row:
                rows.append([game, row.get("skipped") or "ERROR " + row["error"]] + [""] * 4)
                continue
            for cls in C.OURS:
                if cls.name not in row.get("sample_32", {}):
                    continue
                cells = []
                for b in (32, 256):
                    f = row[f"sample_{b}"][cls.name]
                    for key, ratio in (("per_s", "over_uncompressed"), ("window_per_s", "window_over_uncompressed")):
                        cells.append(f"{f[key]:,.0f}" + (f" ({f[ratio]:.0%})" if ratio in f else ""))
                rows.append([game, cls.name, *cells])
        lines += ["", f"dqn_fast compressed against uncompressed in one child [{st}], buffers of {rr['capacity']:,} "
                  "filled through 8 envs; batches/s (in brackets: of the uncompressed buffer's rate, median of "
                  "per-round ratios)", ""[:0], *_table(head, rows, markdown)]
    return lines


def _codec_lines(c: dict, markdown: bool) -> List[str]:
    cc = c.get("codecs")
    if not cc:
        return []
    if "games" not in cc:
        return ["", "frame codings: " + (cc.get("unavailable") or "ERROR " + str(cc.get("error")))]
    methods = list(next(iter(cc["games"].values())))
    head = ["game"] + [f"{m} B/frame" for m in methods] + [f"{m} ns/frame" for m in methods]
    rows = [[g] + [f"{row[m]['bytes_per_frame']:,.0f}" for m in methods]
            + [f"{row[m]['decode_ns_per_frame']:,.0f}" for m in methods] for g, row in cc["games"].items()]
    return ["", f"Frame codings on the first {cc['frames']:,} recorded frames of each game (csrc/codec_probe.hpp): "
            "patch = this project's byte runs against the previous frame, xor-* = a Blosc2 chunk of the XOR with "
            "the previous frame, lz4 / zstd = the frame alone (a key; lz4 is LZ4HC level 4, zstd level 1); "
            "decode = one frame from the previous one (copy + patch, or decompress + XOR), best of 5",
            ""[:0], *_table(head, rows, markdown)]


def lines(r: dict, markdown: bool = False) -> List[str]:
    c = _c(r)
    if not c:
        return []
    s = c["sizes"]
    out = ["", f"Compression on real Atari frames ({'quick' if s.get('quick') else 'full'}): recordings of "
           f"{s['record_steps']:,} steps per game, seeded random policy, replayed in order; buffers of {s['capacity']:,} "
           "transitions, one step per add; per second, medians of interleaved rounds"]
    if "error" in c.get("recordings", {}):
        return out + [f"  recording failed: {c['recordings']['error']}"]
    out.append("  B/transition RSS: RSS growth over the fill / capacity. Sample: the peer's better allocator state; "
               "(Nx / Mx): how many times faster dqn_fast lz4 / zstd was in the same window. Add 1 env: (Nx) dqn_fast "
               "lz4 / the peer in one window")
    if s.get("quick"):
        out.append("  (--quick: buffers this small partly fit in CPU caches; one child per peer for all games)")
    for game in s["games"]:
        rec = c.get("recordings", {}).get(game, {})
        about = (f" ({rec['episodes']} episodes, {rec['mean_episode_steps']:,.0f} steps each on average)"
                 if "episodes" in rec else "")
        out += ["", f"{game}{about}", ""[:0], *_table(HEAD, game_rows(r, game, markdown), markdown)]
    out += _codec_lines(c, markdown)
    out += _ratio_lines(c, markdown)
    f10 = c.get("fill_10m")
    if f10:
        if "rss_growth_gb" in f10:
            envs = f"{f10['num_envs']} env{'s' if f10['num_envs'] > 1 else ''}"
            out += ["", f"dqn_fast lz4 filled with {f10['filled']:,} transitions ({', '.join(f10['played'])} back to back, "
                    f"{envs}): RSS +{f10['rss_growth_gb']:.2f} GB ({f10['rss_bytes_per_transition']:,.0f} B/transition), peak RSS {f10['peak_rss_gb']:.2f} GB, {f10['add_per_s']:,.0f} adds/s; sample_into "
                    f"{f10['sample_32']['per_s']:,.0f}/s (B=32), {f10['sample_256']['per_s']:,.0f}/s (B=256)"]
        else:
            out += ["", "10M fill: " + (f10.get("unavailable") or f10.get("skipped") or "ERROR " + str(f10.get("error")))]
    if c.get("goals"):
        out += ["", "Goals (issue #11)", *[_goal_text(g) for g in c["goals"]]]
    notes = [f"  * {n}: {by['default']['exactness']}" for n, by in c.get("peers", {}).items()
             if by.get("default", {}).get("exactness", "exact") != "exact"]
    if notes:
        out += ["", "Not exact (checked by tests/test_bench_compression.py):", *notes]
    return out


def format_table(r: dict) -> str:
    return "\n".join(lines(r))


def markdown(r: dict) -> str:
    return "\n".join(lines(r, markdown=True)) + "\n"


def plot(r: dict, out_dir: str) -> List[str]:
    """compression.png: per game, RSS bytes per transition (x, log) against
    batches/s at B=32 (y, log), one point per peer and config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = _c(r)
    games = c["sizes"]["games"]
    ours = {cls.name for cls in C.OURS}
    cols = min(len(games), 2)
    rows_ = -(-len(games) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(7 * cols, 5 * rows_), squeeze=False, constrained_layout=True)
    for ax, game in zip(axes.flat, games):
        xs = []
        for name, by in c.get("peers", {}).items():
            if _status(by):
                continue
            d = _game_row(by, "default", game)
            _, f = better(by, game, "sample_32")
            if "memory" not in d or f is None:
                continue
            x, y = d["memory"]["rss_bytes_per_transition"], f["per_s"]
            if x <= 0 or y <= 0:
                continue
            mine = name in ours
            xs.append(x)
            ax.scatter([x], [y], color="#d62728" if mine else "#7f7f7f", s=50 if mine else 35, zorder=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8,
                        color="#d62728" if mine else "#333333")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if xs:  # room for the labels right of the points
            ax.set_xlim(min(xs) / 1.6, max(xs) * 6)
        ax.set_title(game)
        ax.set_xlabel("RSS bytes per transition of capacity (log; lower is better)")
        ax.set_ylabel("batches/s, B=32 (log; higher is better)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(games):]:
        ax.set_visible(False)
    m = r.get("machine", {})
    where = f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores" if m else ""
    fig.suptitle(f"Compressed replay on real Atari frames: memory against sampling speed — buffers of "
                 f"{c['sizes']['capacity']:,}{'; ' + where if where else ''}")
    path = os.path.join(out_dir, "compression.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
