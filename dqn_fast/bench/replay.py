"""Replay benchmark: this project's buffer against the physical reference.

Workload: Atari-shaped streams (84x84 uint8 frames, stack 4, consecutive
observations share 3 frames, episodes of 100-2,000 steps, the reset frame
repeated as padding, like gymnasium's FrameStackObservation), and the
CartPole-sized float32 case where Python overhead dominates.

Reference for sampling: what the fastest existing buffers do, a numpy gather
(`np.take(..., out=preallocated, mode="clip")`) of the same obs and next_obs
rows from a plain (N, 4, 84, 84) array, timed interleaved with our
`sample_into` in the same run.
"""

from __future__ import annotations

import gc
from typing import Iterator, List, Tuple

import numpy as np

from ..replay import ReplayBuffer
from .timing import interleaved, median, rss_bytes

FRAME = (84, 84)
K = 4
FRAME_BYTES = FRAME[0] * FRAME[1]
OBS_BYTES = K * FRAME_BYTES


class AtariStream:
    """One env's steps: (obs, next_obs, terminated, truncated) as views into
    per-episode frame arrays, so producing a step copies nothing."""

    def __init__(self, seed: int, min_len: int = 100, max_len: int = 2000, pool_size: int = 64):
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(0, 256, size=(pool_size, *FRAME), dtype=np.uint8)
        self.min_len, self.max_len = min_len, max_len

    def steps(self) -> Iterator[Tuple[np.ndarray, np.ndarray, bool, bool]]:
        while True:
            length = int(self.rng.integers(self.min_len, self.max_len + 1))
            idx = self.rng.integers(0, len(self.pool), size=length + 1)
            idx = np.concatenate([np.repeat(idx[:1], K - 1), idx])  # reset padding
            frames = np.take(self.pool, idx, axis=0)
            terminated = bool(self.rng.random() < 0.5)
            for t in range(length):
                last = t == length - 1
                yield frames[t : t + K], frames[t + 1 : t + 1 + K], last and terminated, last and not terminated


def atari_buffer(capacity: int, num_envs: int = 1, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer(capacity, (K, *FRAME), np.uint8, frame_stack=K, num_envs=num_envs, seed=seed)


def fill(buf: ReplayBuffer, n: int, seed: int = 0) -> None:
    """Adds n transitions (single-env buffer) from an Atari-shaped stream."""
    steps = AtariStream(seed).steps()
    for i in range(n):
        obs, nxt, term, trunc = next(steps)
        buf.add(obs, i % 6, 1.0, nxt, term, trunc)


def single_env_steps(n: int, seed: int) -> List[tuple]:
    steps = AtariStream(seed).steps()
    out = []
    for i in range(n):
        obs, nxt, term, trunc = next(steps)
        out.append((obs, i % 6, 1.0, nxt, term, trunc))
    return out


def batched_steps(n: int, num_envs: int, seed: int) -> List[tuple]:
    """n lockstep adds for num_envs envs, each env an independent stream."""
    streams = [AtariStream(seed + e).steps() for e in range(num_envs)]
    out = []
    for i in range(n):
        items = [next(s) for s in streams]
        out.append(
            (
                np.stack([it[0] for it in items]),
                np.full(num_envs, i % 6, np.int64),
                np.ones(num_envs, np.float32),
                np.stack([it[1] for it in items]),
                np.array([it[2] for it in items]),
                np.array([it[3] for it in items]),
            )
        )
    return out


def bench_add(quick: bool) -> dict:
    """Transitions/s added from Python: one at a time, 8 envs at once, vectors."""
    n = 4000 if quick else 20000
    repeats = 5 if quick else 9
    single = single_env_steps(n, seed=1)
    batched = batched_steps(n // 8, 8, seed=2)
    rng = np.random.default_rng(3)
    vec = [(o, 0, 1.0, o + 1, False, bool(rng.random() < 0.01)) for o in rng.random((n, 4), dtype=np.float32)]
    buffers = {
        "atari_1env": atari_buffer(n),
        "atari_8env": atari_buffer(n, num_envs=8),
        "cartpole_1env": ReplayBuffer(n, (4,), np.float32, seed=0),
    }
    work = {
        "atari_1env": (buffers["atari_1env"], single),
        "atari_8env": (buffers["atari_8env"], batched),
        "cartpole_1env": (buffers["cartpole_1env"], vec),
    }

    def runner(buf, steps):
        add = buf.add

        def run():
            for args in steps:
                add(*args)

        return run

    times = interleaved({name: runner(*w) for name, w in work.items()}, calls=1, repeats=repeats)
    per_call = {name: len(work[name][1]) for name in work}
    envs = {"atari_1env": 1, "atari_8env": 8, "cartpole_1env": 1}
    result = {}
    for name, ts in times.items():
        rates = [per_call[name] * envs[name] / t for t in ts]
        result[name] = {"transitions_per_s": median(rates), "repeats": rates}
    return result


def bench_sample(quick: bool) -> dict:
    """sample_into vs the numpy gather reference, batch 32 and 256."""
    capacity = 20_000 if quick else 100_000
    repeats = 7 if quick else 15
    buf = atari_buffer(capacity, seed=0)
    fill(buf, capacity + 1000)
    plain = np.empty((capacity, K, *FRAME), np.uint8)
    plain[:] = np.arange(256, dtype=np.uint8)[:FRAME[1]]  # touch every page
    rng = np.random.default_rng(0)
    result = {}
    for batch in (32, 256):
        out = buf.empty_batch(batch)
        window = buf.empty_batch(batch, window=True)
        obs_ref = np.empty((batch, K, *FRAME), np.uint8)
        next_ref = np.empty_like(obs_ref)

        def numpy_gather():
            idx = rng.integers(0, capacity - 1, size=batch)
            np.take(plain, idx, axis=0, out=obs_ref, mode="clip")
            np.take(plain, idx + 1, axis=0, out=next_ref, mode="clip")

        calls = max(3, 2000 // batch)
        times = interleaved(
            {
                "numpy_take": numpy_gather,
                "sample_into": lambda: buf.sample_into(out),
                "sample_into_window": lambda: buf.sample_into(window),
            },
            calls=calls,
            repeats=repeats,
        )
        ref = median(times["numpy_take"])
        row = {}
        for name, ts in times.items():
            t = median(ts)
            frames = K + 1 if name == "sample_into_window" else 2 * K
            row[name] = {
                "us_per_batch": t * 1e6,
                "batches_per_s": 1 / t,
                "output_gb_per_s": batch * frames * FRAME_BYTES / t / 1e9,
                "speedup_vs_numpy_take": ref / t,
                "repeats_us": [x * 1e6 for x in ts],
            }
        result[f"batch_{batch}"] = row
    del plain
    gc.collect()
    return result


def bench_memory(quick: bool) -> dict:
    """nbytes per transition at 1M (default sizing) and RSS after filling."""
    capacity = 1_000_000
    probe = atari_buffer(capacity)  # allocated, untouched: nbytes is exact, RSS is not yet paid
    per_transition = probe.nbytes / capacity
    del probe
    fill_n = 100_000 if quick else 1_000_000
    before = rss_bytes()
    buf = atari_buffer(fill_n)
    fill(buf, fill_n, seed=4)
    after = rss_bytes()
    result = {
        "nbytes_per_transition": per_transition,
        "budget_bytes_per_transition": FRAME_BYTES * 1.05 + 16,
        "nbytes_1M_gb": per_transition * capacity / 1e9,
        "filled_transitions": fill_n,
        "len_after_fill": len(buf),
        "rss_growth_gb": (after - before) / 1e9,
        "rss_after_fill_gb": after / 1e9,
        "rss_growth_per_1M_gb": (after - before) / fill_n * 1e6 / 1e9,
        # What stacked-array buffers hold, from their array shapes (uint8 obs):
        "stacked_obs_only_1M_gb": capacity * OBS_BYTES / 1e9,  # e.g. SB3 optimize_memory_usage=True
        "stacked_obs_and_next_1M_gb": 2 * capacity * OBS_BYTES / 1e9,  # e.g. SB3 default
    }
    del buf
    gc.collect()
    return result
