"""Synthetic environment streams for the benchmarks (no emulator needed).

`AtariEnvs`: lockstep Atari-shaped envs (84x84 uint8 frames, stack 4,
consecutive observations share 3 frames, episodes of varied length, the
reset frame repeated as padding like gymnasium's FrameStackObservation).
`VectorEnvs`: CartPole-sized float32 observations, where per-call Python
overhead dominates. Both hand out fresh arrays each step, as a vector env
does, and end episodes by termination or truncation at random.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

FRAME = (84, 84)
K = 4


class _Episodes:
    """Episode bookkeeping shared by the streams: each env's episode runs for
    a random length, then ends by termination or truncation (half each), and
    that env's next obs is a fresh reset observation."""

    def _end_episodes(self, nxt: np.ndarray):
        self.left -= 1
        done = self.left <= 0
        terminated = done & (self.rng.random(self.n) < 0.5)
        truncated = done & ~terminated
        self.obs = nxt
        if done.any():
            self.obs = nxt.copy()  # next_obs stays the true final obs
            for e in np.flatnonzero(done):
                self.obs[e] = self._reset()
                self.left[e] = self.rng.integers(self.min_len, self.max_len + 1)
        return terminated, truncated


class AtariEnvs(_Episodes):
    """next_obs is obs shifted by one frame plus a new one; an ended episode's
    next_obs is its true final obs and the following obs a reset stack."""

    def __init__(self, num_envs: int, seed: int, min_len: int = 100, max_len: int = 2000, pool_size: int = 64,
                 frame: Tuple[int, ...] = FRAME, k: int = K):
        self.n, self.k = num_envs, k
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(0, 256, size=(pool_size, *frame), dtype=np.uint8)
        self.min_len, self.max_len = min_len, max_len
        self.obs = np.stack([self._reset() for _ in range(num_envs)])
        self.left = self.rng.integers(min_len, max_len + 1, size=num_envs)
        self.actions = np.zeros(num_envs, np.int64)
        self.rewards = np.ones(num_envs, np.float32)

    @property
    def obs_shape(self) -> tuple:
        return self.obs.shape[1:]

    def _reset(self) -> np.ndarray:
        return np.repeat(self.pool[self.rng.integers(len(self.pool))][None], self.k, axis=0)

    def step(self):
        """(obs, action, reward, next_obs, terminated, truncated) for all envs."""
        obs = self.obs
        nxt = np.empty_like(obs)
        nxt[:, : self.k - 1] = obs[:, 1:]
        nxt[:, self.k - 1] = self.pool[self.rng.integers(len(self.pool), size=self.n)]
        terminated, truncated = self._end_episodes(nxt)
        # fresh action/reward arrays too: a buffer may keep references
        actions = self.rng.integers(0, 6, size=self.n)
        rewards = self.rng.integers(-1, 2, size=self.n).astype(np.float32)
        return obs, actions, rewards, nxt, terminated, truncated


class VectorEnvs(_Episodes):
    """CartPole-sized float32 observations (4 values), episodes of 10-500 steps."""

    k = 1

    def __init__(self, num_envs: int, seed: int, dim: int = 4, min_len: int = 10, max_len: int = 500):
        self.n = num_envs
        self.rng = np.random.default_rng(seed)
        self.min_len, self.max_len = min_len, max_len
        self.obs = self.rng.random((num_envs, dim), dtype=np.float32)
        self.left = self.rng.integers(min_len, max_len + 1, size=num_envs)

    @property
    def obs_shape(self) -> tuple:
        return self.obs.shape[1:]

    def _reset(self) -> np.ndarray:
        return self.rng.random(self.obs.shape[1], dtype=np.float32)

    def step(self):
        obs = self.obs
        nxt = self.rng.random(obs.shape, dtype=np.float32)
        terminated, truncated = self._end_episodes(nxt)
        actions = self.rng.integers(0, 2, size=self.n)
        rewards = np.ones(self.n, np.float32)
        return obs, actions, rewards, nxt, terminated, truncated
