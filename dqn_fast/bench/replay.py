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
import time

import numpy as np

from ..replay import ReplayBuffer
from .timing import interleaved, median, rss_bytes

FRAME = (84, 84)
K = 4
FRAME_BYTES = FRAME[0] * FRAME[1]
OBS_BYTES = K * FRAME_BYTES


class AtariEnvs:
    """Lockstep Atari-shaped envs that hand out fresh arrays, as a vector env
    does: next_obs is obs shifted by one frame plus a new one; an ended
    episode's next_obs is its true final obs and the following obs a reset
    stack (the reset frame repeated)."""

    def __init__(self, num_envs: int, seed: int, min_len: int = 100, max_len: int = 2000, pool_size: int = 64):
        self.n = num_envs
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(0, 256, size=(pool_size, *FRAME), dtype=np.uint8)
        self.min_len, self.max_len = min_len, max_len
        self.obs = np.stack([self._reset() for _ in range(num_envs)])
        self.left = self.rng.integers(min_len, max_len + 1, size=num_envs)
        self.actions = np.zeros(num_envs, np.int64)
        self.rewards = np.ones(num_envs, np.float32)

    def _reset(self) -> np.ndarray:
        return np.repeat(self.pool[self.rng.integers(len(self.pool))][None], K, axis=0)

    def step(self):
        """(obs, action, reward, next_obs, terminated, truncated) for all envs."""
        obs = self.obs
        nxt = np.empty_like(obs)
        nxt[:, : K - 1] = obs[:, 1:]
        nxt[:, K - 1] = self.pool[self.rng.integers(len(self.pool), size=self.n)]
        self.left -= 1
        done = self.left <= 0
        terminated = done & (self.rng.random(self.n) < 0.5)
        truncated = done & ~terminated
        self.obs = nxt
        if done.any():
            self.obs = nxt.copy()
            for e in np.flatnonzero(done):
                self.obs[e] = self._reset()
                self.left[e] = self.rng.integers(self.min_len, self.max_len + 1)
        return obs, self.actions, self.rewards, nxt, terminated, truncated


def atari_buffer(capacity: int, num_envs: int = 1, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer(capacity, (K, *FRAME), np.uint8, frame_stack=K, num_envs=num_envs, seed=seed)


def fill(buf: ReplayBuffer, n: int, seed: int = 0) -> None:
    """Adds n transitions per env from Atari-shaped streams."""
    envs = AtariEnvs(buf.num_envs, seed)
    for _ in range(n // buf.num_envs):
        buf.add(*envs.step())


def filled_atari_buffer(capacity: int, seed: int = 0) -> ReplayBuffer:
    """A single-env Atari buffer that has wrapped (full, every page touched)."""
    buf = atari_buffer(capacity, seed=seed)
    fill(buf, capacity + 1000, seed=seed)
    return buf


def numpy_take_gather(plain: np.ndarray, batch: int, seed: int = 0):
    """The physical reference: gather the same obs and next_obs rows from a
    plain (N, k, H, W) array with np.take into preallocated outputs."""
    rng = np.random.default_rng(seed)
    obs = np.empty((batch, *plain.shape[1:]), plain.dtype)
    nxt = np.empty_like(obs)

    def gather():
        idx = rng.integers(0, len(plain) - 1, size=batch)
        np.take(plain, idx, axis=0, out=obs, mode="clip")
        np.take(plain, idx + 1, axis=0, out=nxt, mode="clip")

    return gather


def timed_adds(buf: ReplayBuffer, envs: AtariEnvs, steps: int, unbatched: bool) -> float:
    """Seconds spent inside buf.add over `steps` env steps (env time excluded).

    Single env: unbatched arrays and Python scalars, as a simple loop passes them.
    """
    add, clock, spent = buf.add, time.perf_counter, 0.0
    for _ in range(steps):
        obs, action, reward, nxt, term, trunc = envs.step()
        if unbatched:
            args = (obs[0], int(action[0]), float(reward[0]), nxt[0], bool(term[0]), bool(trunc[0]))
        else:
            args = (obs, action, reward, nxt, term, trunc)
        start = clock()
        add(*args)
        spent += clock() - start
    return spent


def bench_add(quick: bool) -> dict:
    """Transitions/s through buf.add from Python: 1 env, 8 envs at once, vectors.

    Steady state: each buffer is filled past capacity first, so the ring's
    pages are already touched (as they are for all but the first pass of a
    real run). Env time is excluded; the env has just written its arrays.
    """
    steps = 2000 if quick else 8000
    repeats = 5 if quick else 9
    cases = {
        "atari_1env": (atari_buffer(steps // 2), AtariEnvs(1, 1), steps, True),
        "atari_8env": (atari_buffer(steps // 2, num_envs=8), AtariEnvs(8, 2), steps // 8, False),
    }
    for buf, envs, n, unbatched in cases.values():
        timed_adds(buf, envs, n, unbatched)
    rng = np.random.default_rng(3)
    vec = [(o, 0, 1.0, o + 1, False, bool(rng.random() < 0.01)) for o in rng.random((steps, 4), dtype=np.float32)]
    cartpole = ReplayBuffer(steps // 2, (4,), np.float32, seed=0)
    rates = {name: [] for name in [*cases, "cartpole_1env"]}
    for _ in range(repeats):  # interleaved, one repeat of each at a time
        for name, (buf, envs, n, unbatched) in cases.items():
            rates[name].append(n * buf.num_envs / timed_adds(buf, envs, n, unbatched))
        add, start = cartpole.add, time.perf_counter()
        for args in vec:
            add(*args)
        rates["cartpole_1env"].append(len(vec) / (time.perf_counter() - start))
    return {name: {"transitions_per_s": median(r), "repeats": r} for name, r in rates.items()}


def bench_sample(quick: bool) -> dict:
    """sample_into vs the numpy gather reference, batch 32 and 256."""
    capacity = 20_000 if quick else 100_000
    repeats = 7 if quick else 15
    buf = filled_atari_buffer(capacity)
    plain = np.empty((capacity, K, *FRAME), np.uint8)
    plain[:] = np.arange(256, dtype=np.uint8)[:FRAME[1]]  # touch every page
    result = {}
    for batch in (32, 256):
        out = buf.empty_batch(batch)
        window = buf.empty_batch(batch, window=True)
        numpy_gather = numpy_take_gather(plain, batch)
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
