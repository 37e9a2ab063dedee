"""Compressed frame storage on real Atari frames, side by side (issue #11).

Same method as bench/suite.py: each peer in its own child process (the
memory figure is RSS growth from before the peer was built to after it was
filled, with a small instance of the same peer built, filled and sampled
first so imports, JIT compilation and other one-off allocations stay out of
it), interleaved rounds (A, B, A, B, ...), medians, per-round ratios, and
both allocator states (suite.ALLOCATOR_STATES). The frames are recordings
of Pong, Breakout, MsPacman and Seaquest (bench/atari_frames.py: seeded
random policy, 84x84 grayscale, stack 4), replayed in order, one step per
add unless said otherwise.

Per peer and game (bench/peers_compression.py):
  memory  RSS growth per transition of capacity after a fill of `capacity`
          transitions; the payload bytes where the peer exposes them
          (dqn_fast: nbytes, and the frame arena's budget and use);
  sample  batches/s for B=32 and B=256 (torch tensors out; dqn_fast:
          sample_into a preallocated empty_batch, and the k+1 frame window),
          every other peer interleaved with dqn_fast lz4 and zstd buffers of
          the same size and game, so its (Nx) is measured in one window;
  add     transitions/s through add, at steady state (the ring wrapped
          once): one env for everyone (with dqn_fast lz4 beside), and for
          dqn_fast 8 envs per call, interleaved with its one-env round.
dqn_fast alone:
  ratio   sample_into and window rates of lz4 and zstd against the
          uncompressed buffer in the same child, at `ratio_capacity`
          transitions (1M in the full run), filled through 8 envs;
  10M     (full runs; its own `only` name "compression-10m") a 10,000,000
          transition lz4 buffer filled from one env with the four
          recordings back to back, in order, looped: RSS growth and peak.

The goals checked (`goals`): (a) lz4 and zstd mean over the games <= 400 B
per transition of capacity, none above 600; (b) at 1M, compressed sampling
>= 50% of the uncompressed rate, sample_into and window, B=32 and 256;
(c) add >= 50,000 transitions/s from one env, and per transition no slower
with 8 envs; (d) >= 3x less memory per transition than the best peer (the
least RSS per transition in that game) and >= 10x its sampling rate;
(e) the 10M fill grows RSS by less than 4.5 GB.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Dict, List, Optional

import numpy as np

from . import atari_frames as A
from . import peers as P
from . import peers_compression as C
from .suite import add_round, sample_round
from .timing import interleaved, median, rss_bytes

OBS_SHAPE = (A.K, *A.FRAME)
BATCHES = (32, 256)
NAMES = ("compression", "compression-codecs", "compression-ratio", "compression-10m")  # `only` names besides the peers'
GOALS = {"mean_bytes": 400.0, "max_bytes": 600.0, "sample_ratio": 0.5, "add_1env": 50_000.0, "add_8_over_1": 1.0,
         "vs_peer_memory": 3.0, "vs_peer_sample": 10.0, "fill_10m_gb": 4.5}


def sizes(quick: bool) -> dict:
    return dict(
        quick=quick,
        games=list(A.GAMES),
        record_steps=3_000 if quick else 50_000,  # per game; replays loop it
        seed=0,
        capacity=2_000 if quick else 100_000,  # memory and sampling, every peer
        add_capacity=1_000 if quick else 5_000,
        add_steps_1env=200 if quick else 400,
        add_steps_8env=25 if quick else 50,
        repeats=3 if quick else 7,
        calls={32: 10 if quick else 40, 256: 2 if quick else 6},  # per block; blocks repeat for round_s
        round_s=0.02 if quick else 0.1,
        ratio_capacity=20_000 if quick else 1_000_000,  # goal (b): dqn_fast compressed vs uncompressed
        fill_10m=10_000_000,  # goal (e), full runs only
        fill_envs=8,  # the goal (b) buffers
        fill_10m_envs=1,  # the 10M fill: one env, the recordings in order
        child_per_game=not quick,  # quick: one child per peer for all games, malloc_trim between them
        out_dir="bench-results",  # recordings cached in <out_dir>/atari-frames
    )


# --------------------------------------------------------------------------- helpers
def _trim() -> None:
    """Frees what the collector can, and hands glibc's free pages back, so
    a fill measured after an earlier one in the same process is not fed from
    memory that one left in the allocator."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _recordings(s: dict, games=None) -> Dict[str, A.Recording]:
    return {g: A.recording(g, s["record_steps"], s["seed"], s["out_dir"]) for g in (games or s["games"])}


def fill(peer: P.Peer, envs: A.RecordedEnvs, n: int) -> None:
    for _ in range(-(-n // peer.num_envs)):
        peer.add(*peer.prepare(envs.step()))


def _warm_up(cls, rec: A.Recording) -> None:
    """A small instance built, filled past its capacity and sampled: imports,
    JIT compilation (numba), thread pools and first-call caches happen here."""
    peer = cls(64, OBS_SHAPE, A.K, 1, seed=0)
    fill(peer, A.RecordedEnvs(rec, 1, offset=rec.steps // 3), 100)
    for b in BATCHES:
        peer.sample(b)
    if isinstance(peer, C.DqnFastCompressed):
        peer.buf.sample_into(peer.buf.empty_batch(8, window=True, torch=True))
    peer.close()
    del peer


def _state(result: dict) -> dict:
    import torch

    result["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    result["torch_threads"] = torch.get_num_threads()
    return result


def _rate(rates: List[float]) -> dict:
    return {"per_s": median(rates), "repeats": rates}


def _ratio(num: List[float], den: List[float]) -> float:
    return median([a / b for a, b in zip(num, den)])


# --------------------------------------------------------------------------- one peer, in a child
def measure_peer(name: str, games: List[str], s: dict, sample_only: bool = False) -> dict:
    """Every figure of one peer for each game; with sample_only (the warm-allocator
    child), the sampling rows alone."""
    cls = C.BY_NAME[name]
    reason = C.unavailable(cls)
    if reason:
        return _state({"unavailable": reason})
    result: dict = {"exactness": cls.exactness, "games": {}}
    recs = _recordings(s, games)
    _warm_up(cls, recs[games[0]])
    beside_cls = [] if cls in C.OURS else [b for b in C.COMPRESSED_OURS if C.unavailable(b) is None]
    for b in beside_cls:
        _warm_up(b, recs[games[0]])
    for game in games:
        start = time.perf_counter()
        try:
            result["games"][game] = _peer_game(cls, recs[game], s, sample_only, beside_cls)
        except Exception as exc:  # one game's failure is reported, the others go on
            import traceback

            result["games"][game] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["games"][game]["seconds"] = round(time.perf_counter() - start, 2)
        _trim()
    return _state(result)


def _peer_game(cls, rec: A.Recording, s: dict, sample_only: bool, beside_cls: list) -> dict:
    cap = s["capacity"]
    row: dict = {}
    envs = A.RecordedEnvs(rec, 1)
    _trim()
    before = rss_bytes()
    peer = cls(cap, OBS_SHAPE, A.K, 1, seed=1)
    fill(peer, envs, cap)
    del envs
    grown = rss_bytes() - before
    if not sample_only:
        pay = C.payload(peer)
        mem = {"capacity": cap, "filled": cap, "rss_bytes_per_transition": grown / cap,
               "payload_bytes_per_transition": None if pay["payload"] is None else pay["payload"] / cap}
        for k in ("len", "nbytes", "frame_memory", "frame_memory_used", "compression"):
            if k in pay:
                mem[k] = pay[k]
        row["memory"] = mem
    # the same game, another part of the recording, in dqn_fast's compressed buffers beside the peer
    beside = {}
    for b in beside_cls:
        beside[b.name] = b(cap, OBS_SHAPE, A.K, 1, seed=2)
        fill(beside[b.name], A.RecordedEnvs(rec, 1, offset=rec.steps // 2), cap)
    ours = isinstance(peer, C.DqnFastCompressed)
    for batch in BATCHES:
        calls = s["calls"][batch]
        fns = {"peer": sample_round(peer.sample, batch, calls, s["round_s"])}
        if ours:  # the k+1 frame window: obs and next_obs are views of it
            window = peer.buf.empty_batch(batch, window=True, torch=True)
            fns["window"] = sample_round(lambda _b, w=window, buf=peer.buf: buf.sample_into(w), batch, calls, s["round_s"])
        for bname, bp in beside.items():
            fns[bname] = sample_round(bp.sample, batch, calls, s["round_s"])
        rates = interleaved(fns, s["repeats"])
        fig = _rate(rates["peer"])
        if "window" in rates:
            fig["window_per_s"], fig["window_repeats"] = median(rates["window"]), rates["window"]
        if beside:
            fig["beside"] = {b: {**_rate(rates[b]), "speedup": _ratio(rates[b], rates["peer"])} for b in beside}
        row[f"sample_{batch}"] = fig
    peer.close()
    for bp in beside.values():
        bp.close()
    del peer, beside
    _trim()
    if sample_only:
        return row
    row.update(_add_rates(cls, rec, s, beside_cls))
    return row


def _add_rates(cls, rec: A.Recording, s: dict, beside_cls: list) -> dict:
    """Steady-state add: rings of `add_capacity` already wrapped once."""
    cap = s["add_capacity"]
    candidates = {"1env": (cls, 1, s["add_steps_1env"])}
    if cls in C.OURS:
        candidates["8env"] = (cls, 8, s["add_steps_8env"])
    elif beside_cls:
        candidates["beside"] = (beside_cls[0], 1, s["add_steps_1env"])
    fns, peers_ = {}, []
    for i, (role, (c, n, steps)) in enumerate(candidates.items()):
        peer = c(cap, OBS_SHAPE, A.K, n, seed=3 + i)
        envs = A.RecordedEnvs(rec, n, offset=i * rec.steps // 3)
        fill(peer, envs, cap + 100 * n)  # wrapped: steady state; the same stream goes on
        fns[role] = add_round(peer, envs, steps)
        peers_.append(peer)
    rates = interleaved(fns, s["repeats"])
    out = {"add_1env": _rate(rates["1env"])}
    if "8env" in rates:
        out["add_8env"] = {**_rate(rates["8env"]), "over_1env": _ratio(rates["8env"], rates["1env"])}
    if "beside" in rates:
        out["add_1env"]["beside"] = {beside_cls[0].name: {**_rate(rates["beside"]),
                                                          "speedup": _ratio(rates["beside"], rates["1env"])}}
    for p in peers_:
        p.close()
    return out


# --------------------------------------------------------------------------- dqn_fast alone
def measure_ratio(games: List[str], s: dict) -> dict:
    """Goal (b): lz4 and zstd against the uncompressed buffer, one child, one
    stream (8 envs) added to all three, interleaved sampling."""
    reason = C._core_lacks_compression()
    if reason:
        return _state({"unavailable": reason})
    cap = s["ratio_capacity"]
    out: dict = {"capacity": cap, "games": {}}
    recs = _recordings(s, games)
    for cls in C.OURS:
        _warm_up(cls, recs[games[0]])
    for game in games:
        need = cap * (A.FRAME[0] * A.FRAME[1] * 1.1 + 2 * 1_000)
        free = mem_available()
        if free is not None and free < need:
            out["games"][game] = {"skipped": f"needs {need / 1e9:.1f} GB free for the three buffers, "
                                             f"{free / 1e9:.1f} GB available"}
            continue
        envs = A.RecordedEnvs(recs[game], s["fill_envs"])
        _trim()
        start = time.perf_counter()
        before = rss_bytes()
        bufs = {cls.name: cls(cap, OBS_SHAPE, A.K, s["fill_envs"], seed=1) for cls in C.OURS}
        for _ in range(-(-cap // s["fill_envs"])):
            step = envs.step()
            for b in bufs.values():
                b.add(*step)
        row: dict = {"filled": cap, "len": {n: len(b.buf) for n, b in bufs.items()},
                     "rss_growth_gb": (rss_bytes() - before) / 1e9, "fill_seconds": round(time.perf_counter() - start, 1),
                     "nbytes": {n: b.buf.nbytes for n, b in bufs.items()},
                     "frame_memory_used": {n: getattr(b.buf, "frame_memory_used", None) for n, b in bufs.items()}}
        for batch in BATCHES:
            calls = s["calls"][batch]
            fns = {}
            for n, b in bufs.items():
                plain = b.buf.empty_batch(batch, torch=True)
                window = b.buf.empty_batch(batch, window=True, torch=True)
                fns[n] = sample_round(lambda _b, o=plain, buf=b.buf: buf.sample_into(o), batch, calls, s["round_s"])
                fns[n + " window"] = sample_round(lambda _b, o=window, buf=b.buf: buf.sample_into(o), batch, calls,
                                                  s["round_s"])
            rates = interleaved(fns, s["repeats"])
            fig = {}
            for n in bufs:
                fig[n] = {**_rate(rates[n]), "window_per_s": median(rates[n + " window"]),
                          "window_repeats": rates[n + " window"]}
                if n != C.DqnFastCompressed.name:
                    fig[n]["over_uncompressed"] = _ratio(rates[n], rates[C.DqnFastCompressed.name])
                    fig[n]["window_over_uncompressed"] = _ratio(rates[n + " window"],
                                                                rates[C.DqnFastCompressed.name + " window"])
            row[f"sample_{batch}"] = fig
        out["games"][game] = row
        del bufs, envs
        _trim()
    return _state(out)


def measure_fill_10m(s: dict) -> dict:
    """Goal (e): RSS growth of a 10M-transition lz4 buffer filled through
    `fill_10m_envs` envs (one: each add a single transition) with the four
    recordings back to back, in order, looped."""
    reason = C._core_lacks_compression()
    if reason:
        return _state({"unavailable": reason})
    n = s["fill_10m"]
    free = mem_available()
    need = GOALS["fill_10m_gb"] * 1e9 * 1.3
    if free is not None and free < need:
        return _state({"skipped": f"needs {need / 1e9:.1f} GB free, {free / 1e9:.1f} GB available"})
    recs = _recordings(s)
    _warm_up(C.DqnFastLz4, recs[s["games"][0]])
    envs = A.RecordedEnvs([recs[g] for g in s["games"]], s["fill_10m_envs"])
    del recs
    _trim()
    before = rss_bytes()
    start = time.perf_counter()
    peer = C.DqnFastLz4(n, OBS_SHAPE, A.K, envs.n, seed=1)
    add, prepare = peer.add, peer.prepare
    for _ in range(-(-n // envs.n)):
        add(*prepare(envs.step()))
    seconds = time.perf_counter() - start
    grown = rss_bytes() - before
    pay = C.payload(peer)
    out = {"filled": envs.produced, "num_envs": envs.n, "played": list(s["games"]), "seconds": round(seconds, 1),
           "add_per_s": envs.produced / seconds, "rss_growth_gb": grown / 1e9, "rss_bytes_per_transition": grown / n,
           "peak_rss_gb": _peak_rss() / 1e9, "baseline_rss_gb": before / 1e9, **pay}
    for batch in BATCHES:
        o = peer.buf.empty_batch(batch, torch=True)
        rates = interleaved({"s": sample_round(lambda _b, o=o: peer.buf.sample_into(o), batch, s["calls"][batch],
                                               s["round_s"])}, s["repeats"])
        out[f"sample_{batch}"] = _rate(rates["s"])
    return _state(out)


def record_all(s: dict) -> dict:
    """Records (or finds in the cache) every game; a summary of each."""
    out = {}
    for game in s["games"]:
        start = time.perf_counter()
        path = A.cache_path(s["out_dir"], game, s["record_steps"], s["seed"])
        cached = os.path.exists(path)
        rec = A.recording(game, s["record_steps"], s["seed"], s["out_dir"])
        ends = np.flatnonzero(rec.terminated | rec.truncated)
        lengths = np.diff(np.concatenate([[-1], ends]))
        out[game] = {"steps": rec.steps, "frames": len(rec.frames), "episodes": rec.episodes,
                     "mean_episode_steps": float(lengths.mean()), "terminated": int(rec.terminated.sum()),
                     "path": path, "cached": cached, "seconds": round(time.perf_counter() - start, 1),
                     "policy": A.POLICY, "versions": (rec.meta or {}).get("versions")}
        del rec
    return out


CODEC_METHODS = ("patch", "xor-lz4", "xor-zstd", "lz4", "zstd")


def measure_codecs(s: dict) -> dict:
    """How the frame codings compare on each game's recorded frames, in C++
    (csrc/codec_probe.hpp): bytes and decode time per frame, each frame coded
    against the one before it (patch: this project's byte runs; xor-lz4 and
    xor-zstd: a Blosc2 chunk of the XOR, as the library would do it) or alone
    (lz4, zstd: what a key frame costs). Best of 5 decode passes."""
    from .. import _core

    frames_n = s.get("codec_frames", 5_000)
    out = {"frames": frames_n, "games": {}}
    for game, rec in _recordings(s).items():
        frames = np.ascontiguousarray(rec.frames[:frames_n])
        row = {}
        for method in CODEC_METHODS:
            size, seconds = _core._probe_codec(frames, method, 5)
            row[method] = {"bytes_per_frame": size / (len(frames) - 1),
                           "decode_ns_per_frame": seconds / (len(frames) - 1) * 1e9}
        out["games"][game] = row
    return out


# --------------------------------------------------------------------------- goals
def _better(by_state: dict, game: str, col: str):
    """The (state, figure) where the peer sampled faster."""
    figs = [(st, r["games"][game][col]) for st, r in by_state.items()
            if isinstance(r, dict) and col in r.get("games", {}).get(game, {})]
    return max(figs, key=lambda f: f[1]["per_s"]) if figs else (None, None)


def goals(r: dict) -> List[dict]:
    """Each goal per dqn_fast compressed config: value, threshold, met (None: not measured)."""
    out: List[dict] = []
    games = r["sizes"]["games"]
    peers = r.get("peers", {})

    def game_rows(name: str) -> dict:
        d = peers.get(name, {}).get("default", {})
        return {g: row for g, row in d.get("games", {}).items() if "memory" in row}

    for cls in C.COMPRESSED_OURS:
        name = cls.name
        rows = game_rows(name)
        # (a) memory
        mem = {g: rows[g]["memory"]["rss_bytes_per_transition"] for g in games if g in rows}
        if len(mem) == len(games):
            mean, worst = float(np.mean(list(mem.values()))), max(mem.values())
            out.append({"goal": "a", "config": name, "what": "RSS B/transition of capacity, mean over the games (max)",
                        "value": mean, "max": worst, "game_values": mem,
                        "met": mean <= GOALS["mean_bytes"] and worst <= GOALS["max_bytes"],
                        "threshold": f"mean <= {GOALS['mean_bytes']:.0f}, none > {GOALS['max_bytes']:.0f}"})
        else:
            out.append({"goal": "a", "config": name, "met": None, "what": "RSS B/transition of capacity",
                        "note": f"measured for {sorted(mem)} of {games}"})
        # (b) sampling against uncompressed, same child
        ratio = r.get("ratio", {}).get("default", {})
        for batch in BATCHES:
            for mode, key in (("sample_into", "over_uncompressed"), ("window", "window_over_uncompressed")):
                vals = {g: row[f"sample_{batch}"][name][key] for g, row in ratio.get("games", {}).items()
                        if f"sample_{batch}" in row and name in row[f"sample_{batch}"]}
                out.append({"goal": "b", "config": name, "batch": batch, "mode": mode,
                            "what": f"{mode} B={batch} at {ratio.get('capacity', r['sizes']['ratio_capacity']):,} transitions, "
                                    "/ uncompressed",
                            "value": min(vals.values()) if vals else None, "game_values": vals,
                            "threshold": f">= {GOALS['sample_ratio']:.0%}",
                            "met": (min(vals.values()) >= GOALS["sample_ratio"] and len(vals) == len(games)) if vals else None})
        # (c) add
        one = {g: rows[g]["add_1env"]["per_s"] for g in games if g in rows and "add_1env" in rows[g]}
        eight = {g: rows[g]["add_8env"]["over_1env"] for g in games if g in rows and "add_8env" in rows[g]}
        out.append({"goal": "c", "config": name, "what": "add from one env, transitions/s (slowest game)",
                    "value": min(one.values()) if one else None, "game_values": one,
                    "threshold": f">= {GOALS['add_1env']:,.0f}",
                    "met": (min(one.values()) >= GOALS["add_1env"] and len(one) == len(games)) if one else None})
        out.append({"goal": "c", "config": name, "what": "add per transition, 8 envs / 1 env (slowest game)",
                    "value": min(eight.values()) if eight else None, "game_values": eight,
                    "threshold": f">= {GOALS['add_8_over_1']:.2f}",
                    "met": (min(eight.values()) >= GOALS["add_8_over_1"] and len(eight) == len(games)) if eight else None})
        # (d) against the best peer (least RSS per transition in that game)
        mem_ratio, sample_ratio, best = {}, {b: {} for b in BATCHES}, {}
        for g in games:
            others = {}
            for other in C.OTHERS:
                row = peers.get(other.name, {}).get("default", {}).get("games", {}).get(g, {})
                if "memory" in row:
                    others[other.name] = row["memory"]["rss_bytes_per_transition"]
            if not others or g not in mem:
                continue
            best_name = min(others, key=others.get)
            best[g] = best_name
            mem_ratio[g] = others[best_name] / max(mem[g], 1e-9)
            for b in BATCHES:
                _, fig = _better(peers[best_name], g, f"sample_{b}")
                if fig and name in fig.get("beside", {}):
                    sample_ratio[b][g] = fig["beside"][name]["speedup"]
        out.append({"goal": "d", "config": name, "what": "best peer's RSS B/transition / ours (smallest over games)",
                    "value": min(mem_ratio.values()) if mem_ratio else None, "game_values": mem_ratio, "best_peer": best,
                    "threshold": f">= {GOALS['vs_peer_memory']:g}x",
                    "met": (min(mem_ratio.values()) >= GOALS["vs_peer_memory"] and len(mem_ratio) == len(games))
                    if mem_ratio else None})
        for b in BATCHES:
            vals = sample_ratio[b]
            out.append({"goal": "d", "config": name, "batch": b,
                        "what": f"sampling B={b}, ours / best peer in its better allocator state (smallest over games)",
                        "value": min(vals.values()) if vals else None, "game_values": vals, "best_peer": best,
                        "threshold": f">= {GOALS['vs_peer_sample']:g}x",
                        "met": (min(vals.values()) >= GOALS["vs_peer_sample"] and len(vals) == len(games)) if vals else None})
    f10 = r.get("fill_10m")
    if f10 is not None:
        gb = f10.get("rss_growth_gb")
        out.append({"goal": "e", "config": C.DqnFastLz4.name, "what": f"RSS growth over a {r['sizes']['fill_10m']:,} fill, GB",
                    "value": gb, "threshold": f"< {GOALS['fill_10m_gb']:g} GB",
                    "met": None if gb is None else gb < GOALS["fill_10m_gb"],
                    "note": f10.get("skipped") or f10.get("unavailable") or f10.get("error")})
    return out


# --------------------------------------------------------------------------- orchestration
def _wanted(only):
    if not only or "compression" in only:
        return lambda name: True
    ours = "dqn_fast" in only  # the suite's name for this project: all of its rows here
    own = {c.name for c in C.OURS} | {"compression-ratio"}
    return lambda name: name in only or (ours and name in own)


def _status(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    if "unavailable" in r or "skipped" in r:
        return r.get("unavailable") or r["skipped"]
    errors = [f"{g}: {row['error']}" for g, row in r.get("games", {}).items() if "error" in row]
    return "; ".join(errors) if errors else "done"


def run_compression(s: dict, in_child, states: dict, log=print, only=None) -> dict:
    """{"sizes", "recordings", "peers": {peer: {state: ...}}, "ratio": {state: ...}, "fill_10m", "goals"}."""
    s = {**sizes(bool(s.get("quick", False))), **s}
    want = _wanted(only)
    out: dict = {"sizes": {k: ({str(b): c for b, c in v.items()} if k == "calls" else v) for k, v in s.items()},
                 "peers": {}, "ratio": {}}
    start = time.time()
    out["recordings"] = rec = in_child(record_all, s)
    if "error" in rec:
        log(f"  compression: recording the games failed: {rec['error']}")
        out["goals"] = goals(out)
        return out
    log(f"  compression: recordings of {', '.join(s['games'])} ({s['record_steps']:,} steps each; "
        f"{sum(not v['cached'] for v in rec.values())} new) ({time.time() - start:.0f} s)")
    default_state = next(iter(states))
    if want("compression-codecs"):
        started = time.time()
        out["codecs"] = r = in_child(measure_codecs, s, env=states[default_state])
        log(f"  frame codings compared: {_status(r)} ({time.time() - started:.0f} s)")
    for cls in C.COMPRESSION_PEERS:
        if not want(cls.name):
            continue
        missing = cls.missing()
        if missing:
            out["peers"][cls.name] = {"missing": missing}
            log(f"  {cls.name}: {missing}")
            continue
        out["peers"][cls.name] = per_state = {}
        for state, env in states.items():
            started = time.time()
            sample_only = state != default_state
            if s["child_per_game"] and not sample_only:
                r: dict = {"games": {}}
                for g in s["games"]:
                    part = in_child(measure_peer, cls.name, [g], s, False, env=env)
                    if "unavailable" in part:  # the same for every game
                        r = part
                        break
                    if "games" not in part:  # a child that died: that game's row says so
                        r["games"][g] = {"error": part.get("error", "no result")}
                        continue
                    r["games"].update(part["games"])
                    r.update({k: v for k, v in part.items() if k != "games"})
            else:
                r = in_child(measure_peer, cls.name, list(s["games"]), s, sample_only, env=env)
            per_state[state] = r
            log(f"  {cls.name} [{state}{', sampling' if sample_only else ''}]: {_status(r)} ({time.time() - started:.0f} s)")
            if "unavailable" in r:
                break
    if want("compression-ratio"):
        for state, env in states.items():
            started = time.time()
            out["ratio"][state] = r = in_child(measure_ratio, list(s["games"]), s, env=env)
            log(f"  dqn_fast compressed / uncompressed at {s['ratio_capacity']:,} [{state}]: {_status(r)} "
                f"({time.time() - started:.0f} s)")
            if "unavailable" in r:
                break
    if not s["quick"] and want("compression-10m"):
        started = time.time()
        out["fill_10m"] = r = in_child(measure_fill_10m, s, env=states[default_state])
        log(f"  dqn_fast lz4 {s['fill_10m']:,}-transition fill: {_status(r)} ({time.time() - started:.0f} s)")
    out["goals"] = goals(out)
    return out


def main(argv=None) -> int:
    """python -m dqn_fast.bench.compression [--quick] [--out DIR] [--only NAMES]: this benchmark alone."""
    import argparse
    import json

    from . import report_compression
    from .suite import ALLOCATOR_STATES, in_child
    from .timing import machine, versions

    parser = argparse.ArgumentParser(prog="python -m dqn_fast.bench.compression", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--out", default="bench-results", help="directory for compression.json/.md/.png and the recordings")
    parser.add_argument("--only", default=None, help="comma-separated names: peers of bench/peers_compression.py, "
                                                     + ", ".join(NAMES))
    args = parser.parse_args(argv)
    only = None if args.only is None else [p.strip() for p in args.only.split(",") if p.strip()]
    known = set(C.BY_NAME) | set(NAMES) | {"dqn_fast"}
    unknown = [p for p in only or [] if p not in known]
    if unknown:
        parser.error(f"--only: unknown {unknown}; expected names from {sorted(known)}")
    started = time.time()
    s = {**sizes(args.quick), "out_dir": args.out}
    print(f"dqn-fast compression bench ({'quick' if args.quick else 'full'}): one child process per peer", flush=True)
    results = {"machine": machine(), "versions": versions(), "quick": args.quick,
               "compression": run_compression(s, in_child, ALLOCATOR_STATES, log=lambda m: print(m, flush=True), only=only)}
    results["seconds"] = time.time() - started
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compression.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "compression.md"), "w") as f:
        f.write(report_compression.markdown(results))
    print()
    print(report_compression.format_table(results))
    try:
        plots = report_compression.plot(results, args.out)
    except ImportError:
        plots = []
        print("\nplot skipped: matplotlib is not installed")
    print("".join(f"\nplot: {p}" for p in plots) + f"\n({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
