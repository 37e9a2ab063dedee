"""The side-by-side replay measurements behind `dqn-fast bench`.

Each peer is measured in its own child process, next to this project's
buffer and the physical reference, interleaved (A, B, C, A, B, C, ...) so
a burst of load elsewhere on a shared machine hits all alike; every ratio
comes from one such window. A child process per peer also makes the memory
figure clean: RSS growth from before the peer was built to after it was
filled, with no other peer's arrays or allocator caches around.

Per peer, Atari-shaped (84x84 uint8 frames, stack 4):
  add       transitions/s through its add call (stream generation excluded),
            one transition at a time (1 env) and 8 envs per call, at steady
            state (the ring already wrapped once);
  sample    batches/s and output GB/s for batch 32 and 256, including the
            conversion to torch tensors, from a buffer of `capacity`;
  memory    RSS growth per transition after filling `capacity`, the storage
            arrays' bytes where exposed, and both projected to 1M.
And the CartPole-sized float32 case (add 1 env, sample 32/256).
Every peer's Atari sampling is measured again in a second child whose glibc
allocator is warm (ALLOCATOR_STATES): peers that allocate their output per
call page-fault it anew in the default state; the report quotes the ratio
against each peer's better state. Prioritized and n-step replay: bench/features.py.
This project alone: RSS at 1M transitions, sample_into a pinned tensor when
CUDA is present, memcpy bandwidth on this machine, and sampling on one
thread against the default threads, quiet and with one core busy
(bench/under_load.py).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Dict, Optional

import numpy as np

from . import peers as P
from .streams import FRAME, K, AtariEnvs, VectorEnvs
from .timing import block_rate, interleaved, median, rss_bytes
from .under_load import measure_under_load

FRAME_BYTES = FRAME[0] * FRAME[1]
OBS_SHAPE = (K, *FRAME)
VECTOR_SHAPE = (4,)
# The environment of each child: glibc's defaults (these variables removed), and
# fixed high thresholds, the state a long-running trainer usually reaches (large
# outputs are reused from the heap instead of mmapped and faulted in per call).
WARM_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "67108864"}
ALLOCATOR_STATES = {"default": {k: None for k in WARM_MALLOC}, "warm": WARM_MALLOC}


def sizes(quick: bool) -> dict:
    return dict(
        capacity=5_000 if quick else 100_000,
        vector_capacity=2_000 if quick else 20_000,  # per-call overhead, not size, is the point there
        add_capacity=1_000 if quick else 5_000,
        repeats=3 if quick else 7,
        add_steps_1env=200 if quick else 400,
        add_steps_8env=25 if quick else 50,
        calls={32: 20 if quick else 40, 256: 3 if quick else 6},  # per block; blocks repeat for round_s
        round_s=0.02 if quick else 0.1,  # the shortest timed sampling round
        ours_fill=50_000 if quick else 1_000_000,
        load_window_s=0.25 if quick else 1.0,  # one timed round of the one-core-busy case
        feature_capacity=5_000 if quick else 100_000,  # prioritized and n-step, filled one step per add
    )


# --------------------------------------------------------------------------- helpers
def make(cls, capacity: int, workload: str, num_envs: int, seed: int = 0, **kwargs) -> P.Peer:
    shape, k = (OBS_SHAPE, K) if workload == "atari" else (VECTOR_SHAPE, 1)
    return cls(capacity, shape, k, num_envs, seed=seed, **kwargs)


def stream(workload: str, num_envs: int, seed: int):
    return AtariEnvs(num_envs, seed) if workload == "atari" else VectorEnvs(num_envs, seed)


def fill(peer: P.Peer, n: int, workload: str, seed: int):
    """Adds n transitions from a new stream; returns the stream, to be continued."""
    envs = stream(workload, peer.num_envs, seed)
    for _ in range(-(-n // peer.num_envs)):
        peer.add(*peer.prepare(envs.step()))
    return envs


def fill_fast(cls, capacity: int, workload: str, seed: int, **kwargs) -> P.Peer:
    """A peer holding `capacity` transitions, filled through 8 envs where it takes them (faster)."""
    n = 8 if cls.supports(8) is None else 1
    peer = make(cls, capacity, workload, n, seed, **kwargs)
    fill(peer, capacity, workload, seed)
    return peer


def add_round(peer: P.Peer, envs, n_steps: int) -> Callable[[], float]:
    """One timed round: the next `n_steps` steps of the (continuing) stream are
    generated and prepared first, then added in one timed loop."""

    def run() -> float:
        args = [peer.prepare(envs.step()) for _ in range(n_steps)]
        add = peer.add
        start = time.perf_counter()
        for a in args:
            add(*a)
        return n_steps * peer.num_envs / (time.perf_counter() - start)

    return run


def sample_round(sample: Callable[[int], object], batch: int, calls: int, min_s: float = 0.0) -> Callable[[], float]:
    """One timed round: blocks of `calls` samples for at least `min_s` seconds (timing.block_rate)."""

    def block() -> None:
        for _ in range(calls):
            sample(batch)

    return lambda: block_rate(block, calls, min_s)


def numpy_take_gather(plain: np.ndarray, batch: int, seed: int = 0):
    """The physical reference: the same obs and next_obs rows gathered from a
    plain (N, k, H, W) array with np.take into preallocated outputs."""
    rng = np.random.default_rng(seed)
    obs = np.empty((batch, *plain.shape[1:]), plain.dtype)
    nxt = np.empty_like(obs)

    def gather(_batch=batch):
        idx = rng.integers(0, len(plain) - 1, size=batch)
        np.take(plain, idx, axis=0, out=obs, mode="clip")
        np.take(plain, idx + 1, axis=0, out=nxt, mode="clip")

    return gather


def plain_frames(n: int, shape: tuple, dtype) -> np.ndarray:
    a = np.empty((n, *shape), dtype)
    a[:] = 1  # touch every page
    return a


def ratio_summary(rates: Dict[str, list], peer: str, ours: str = "ours") -> dict:
    """Median rate and the median of per-repeat ratios ours/peer (how many times faster we are)."""
    out = {
        "per_s": median(rates[peer]),
        "repeats": rates[peer],
        "dqn_fast_per_s": median(rates[ours]),
        "dqn_fast_repeats": rates[ours],
    }
    out["dqn_fast_speedup"] = median([o / p for o, p in zip(rates[ours], rates[peer])])
    return out


# --------------------------------------------------------------------------- one peer, in a child
def measure_peer(name: str, s: dict, sample_only: bool = False) -> dict:
    """Every figure in the table; with sample_only (the warm-allocator child),
    the Atari sampling rows alone (adds and CartPole-sized batches allocate
    below glibc's mmap threshold, so the allocator state does not reach them)."""
    import os

    import torch

    cls = P.BY_NAME[name]
    # everyone at their defaults: torch's threads for the peers, dqn_fast's own sampler threads
    result: dict = {"exactness": cls.exactness, "torch_threads": torch.get_num_threads(),
                    "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    atari, vector = {}, {}
    result["atari"], result["vector"] = atari, vector

    clock = time.perf_counter()
    phases = result["phase_seconds"] = {}

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = round(now - clock, 2)
        clock = now

    # memory: RSS growth from before construction to after filling `capacity`,
    # once a small instance has imported and warmed up everything the peer uses
    warm = fill_fast(cls, 64, "atari", seed=0)
    warm.sample(8)
    warm.close()
    del warm
    gc.collect()
    before = rss_bytes()
    peer = fill_fast(cls, s["capacity"], "atari", seed=1)
    grown = rss_bytes() - before
    stored = peer.nbytes()
    atari["memory"] = {
        "filled": s["capacity"],
        "rss_bytes_per_transition": grown / s["capacity"],
        "storage_bytes_per_transition": None if stored is None else stored / s["capacity"],
        "projected_1M_gb": grown / s["capacity"] * 1e6 / 1e9,
    }

    phase("fill")
    # sample, interleaved with ours (and, in our own row, the physical reference)
    frames = 2 * K  # obs + next_obs, as handed to the learner
    extra = {}
    if cls is P.DqnFast:
        ours = peer
        result["sample_threads"] = ours.buf.sample_threads
        if not sample_only:
            # the same stream in a buffer sampling on one thread, against single-threaded
            # numpy and memcpy; and a plain (N, 4, 84, 84) array for the numpy gather
            extra["one_thread"] = fill_fast(P.DqnFast, s["capacity"], "atari", seed=1, sample_threads=1)
            extra["plain"] = plain_frames(s["capacity"], OBS_SHAPE, np.uint8)
    else:
        ours = fill_fast(P.DqnFast, s["capacity"], "atari", seed=2)
    for batch in (32, 256):
        calls = s["calls"][batch]
        fns = {"ours": sample_round(ours.sample, batch, calls, s["round_s"])}
        if cls is not P.DqnFast:
            fns["peer"] = sample_round(peer.sample, batch, calls, s["round_s"])
        else:  # this project also: the k+1 frame window (obs and next_obs are views of it)
            window = ours.buf.empty_batch(batch, window=True, torch=True)
            fns["window"] = sample_round(lambda _b, w=window, buf=ours.buf: buf.sample_into(w), batch, calls, s["round_s"])
            if extra:
                fns["one_thread"] = sample_round(extra["one_thread"].sample, batch, calls, s["round_s"])
                fns["numpy_take"] = sample_round(numpy_take_gather(extra["plain"], batch), batch, calls, s["round_s"])
        rates = interleaved(fns, s["repeats"])
        row = ratio_summary(rates, "peer" if "peer" in rates else "ours")
        row["out_gb_per_s"] = row["per_s"] * batch * frames * FRAME_BYTES / 1e9
        for name, nframes in (("window", K + 1), ("one_thread", frames), ("numpy_take", frames)):
            if name in rates:
                row[f"{name}_per_s"] = median(rates[name])
                row[f"{name}_repeats"] = rates[name]
                row[f"{name}_out_gb_per_s"] = row[f"{name}_per_s"] * batch * nframes * FRAME_BYTES / 1e9
        atari[f"sample_{batch}"] = row
    peer.close()
    del peer, ours, extra
    gc.collect()

    phase("sample")
    if sample_only:
        return result
    # add at steady state: small rings already wrapped once
    for n, steps in ((1, s["add_steps_1env"]), (8, s["add_steps_8env"])):
        if cls.supports(n):
            atari[f"add_{n}env"] = {"not_applicable": cls.supports(n)}
            continue
        atari[f"add_{n}env"] = add_window(cls, "atari", n, steps, s)

    phase("add")
    # the CartPole-sized case: Python overhead per call dominates
    vector["add_1env"] = add_window(cls, "vector", 1, s["add_steps_1env"] * 4, s)
    phase("vector_add")
    v_peer = fill_fast(cls, s["vector_capacity"], "vector", seed=1)
    v_ours = v_peer if cls is P.DqnFast else fill_fast(P.DqnFast, s["vector_capacity"], "vector", seed=2)
    for batch in (32, 256):
        fns = {"ours": sample_round(v_ours.sample, batch, 4 * s["calls"][batch], s["round_s"])}
        if cls is not P.DqnFast:
            fns["peer"] = sample_round(v_peer.sample, batch, 4 * s["calls"][batch], s["round_s"])
        rates = interleaved(fns, s["repeats"])
        vector[f"sample_{batch}"] = ratio_summary(rates, "peer" if "peer" in rates else "ours")
    v_peer.close()
    phase("vector_sample")
    return result


def add_window(cls, workload: str, n: int, n_steps: int, s: dict) -> dict:
    peers_ = {"peer": make(cls, s["add_capacity"], workload, n, seed=3)}
    if cls is not P.DqnFast:
        peers_["ours"] = make(P.DqnFast, s["add_capacity"], workload, n, seed=4)
    fns = {}
    for i, (role, peer) in enumerate(peers_.items()):
        envs = fill(peer, s["add_capacity"] + 100 * n, workload, seed=5 + i)  # wrapped: steady state
        fns[role] = add_round(peer, envs, n_steps)  # the same stream goes on
    rates = interleaved(fns, s["repeats"])
    for peer in peers_.values():
        peer.close()
    return ratio_summary(rates, "peer", "ours" if "ours" in rates else "peer")


# --------------------------------------------------------------------------- this project alone
def measure_ours(s: dict) -> dict:
    import torch

    out: dict = {}
    # memcpy bandwidth: bytes copied per second, 256 MB arrays (beyond any cache)
    src = np.ones(256 << 20, np.uint8)
    dst = np.zeros_like(src)
    rates = []
    for _ in range(max(3, s["repeats"])):
        start = time.perf_counter()
        np.copyto(dst, src)
        rates.append(src.nbytes / (time.perf_counter() - start) / 1e9)
    out["memcpy_gb_per_s"] = median(rates)
    out["memcpy_repeats"] = rates
    del src, dst

    # sample_into a pinned tensor: what the CUDA prefetcher does
    if torch.cuda.is_available():
        buf = fill_fast(P.DqnFast, s["capacity"], "atari", seed=1).buf
        pinned = {b: buf.empty_batch(b, window=True, torch=True, pin_memory=True) for b in (32, 256)}
        plain = {b: buf.empty_batch(b, window=True, torch=True) for b in (32, 256)}
        for b in (32, 256):
            rates = interleaved({"pinned": sample_round(lambda _b, o=pinned[b]: buf.sample_into(o), b, s["calls"][b], s["round_s"]),
                                 "pageable": sample_round(lambda _b, o=plain[b]: buf.sample_into(o), b, s["calls"][b], s["round_s"])},
                                s["repeats"])
            out[f"sample_into_pinned_{b}"] = {"per_s": median(rates["pinned"]), "pageable_per_s": median(rates["pageable"]),
                                              "repeats": rates["pinned"]}
        del buf, pinned, plain
    else:
        out["sample_into_pinned"] = "needs CUDA (pinned memory); see benchmarks/results/gpu_h200.json"

    # RSS at `ours_fill` transitions (1M in the full run): episodes of 100-2,000 steps,
    # one step per add, the same stream as the prioritized buffer beside it
    from .features import fill_steps, measure_1m

    gc.collect()
    before = rss_bytes()
    peer = make(P.DqnFast, s["ours_fill"], "atari", 1, seed=4)
    fill_steps([peer], s["ours_fill"], seed=4)
    grown = rss_bytes() - before
    out["memory"] = {
        "filled": s["ours_fill"],
        "len": len(peer.buf),
        "rss_growth_gb": grown / 1e9,
        "rss_bytes_per_transition": grown / s["ours_fill"],
        "nbytes_per_transition": peer.buf.nbytes / s["ours_fill"],
        "frame_bytes": FRAME_BYTES,
    }
    out["prioritized"] = measure_1m({**s, "ours_fill_seed": 4}, peer)
    return out


# --------------------------------------------------------------------------- orchestration
def _child(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # a broken peer is reported, and the run goes on
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def in_child(fn, *args, env: Optional[dict] = None) -> dict:
    """Runs fn(*args) in a fresh process, so its memory is its own and is freed
    after; `env` sets (None: removes) variables of its environment, which glibc
    reads when the process starts."""
    ctx = multiprocessing.get_context("spawn")
    saved = {k: os.environ.get(k) for k in env or {}}
    try:
        for k, v in (env or {}).items():
            _setenv(k, v)
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(_child, fn, *args).result()
    except BrokenProcessPool:
        return {"error": "the child process died (out of memory?)"}
    finally:
        for k, v in saved.items():
            _setenv(k, v)


def _setenv(key: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def run_suite(quick: bool, only: Optional[list] = None, log=print, sizes_override: Optional[dict] = None,
              alone: bool = True, features: bool = True) -> dict:
    """Every peer (or those named in `only`) in both allocator states, the
    prioritized and n-step comparison, then this project alone."""
    s = {**sizes(quick), **(sizes_override or {})}
    results: dict = {"sizes": {k: ({str(b): c for b, c in v.items()} if k == "calls" else v) for k, v in s.items()},
                     "peers": {}}
    for cls in P.COMPARED:
        if only and cls.name not in only:
            continue
        missing = cls.missing()
        if missing:
            results["peers"][cls.name] = {"missing": missing}
            log(f"  {cls.name}: {missing}")
            continue
        start = time.time()
        results["peers"][cls.name] = in_child(measure_peer, cls.name, s, env=ALLOCATOR_STATES["default"])
        err = results["peers"][cls.name].get("error")
        phases = ", ".join(f"{k} {v:.0f}" for k, v in results["peers"][cls.name].get("phase_seconds", {}).items())
        log(f"  {cls.name}: {'ERROR ' + err if err else 'done'} ({time.time() - start:.0f} s: {phases})")
    # the Atari sampling again, each peer in a child with a warm allocator
    results["peers_warm"] = {}
    for cls in P.COMPARED:
        if cls.name not in results["peers"] or "missing" in results["peers"][cls.name]:
            continue
        start = time.time()
        r = results["peers_warm"][cls.name] = in_child(measure_peer, cls.name, s, True, env=ALLOCATOR_STATES["warm"])
        log(f"  {cls.name} [warm allocator]: {'ERROR ' + r['error'] if 'error' in r else 'done'} "
            f"({time.time() - start:.0f} s)")
    if features:
        from .features import run_features

        results["features"] = run_features(s, in_child, ALLOCATOR_STATES, log=log, only=only)
    if not alone:
        return results
    start = time.time()
    results["dqn_fast_alone"] = in_child(measure_ours, s, env=ALLOCATOR_STATES["default"])
    err = results["dqn_fast_alone"].get("error")
    log(f"  dqn_fast alone (memcpy, {s['ours_fill']:,}-transition fill): {'ERROR ' + err if err else 'done'} "
        f"({time.time() - start:.0f} s)")
    start = time.time()
    results["under_load"] = in_child(measure_under_load, s, env=ALLOCATOR_STATES["default"])
    err = results["under_load"].get("error")
    log(f"  dqn_fast sampling quiet and with one core busy: {'ERROR ' + err if err else 'done'} "
        f"({time.time() - start:.0f} s)")
    return results
