"""The reference the native buffer is checked against, and the streams fed to both.

``ReferenceReplay`` is the classic replay: it copies every full
(obs, action, reward, next_obs, terminated, truncated) tuple, keyed by
insertion id, and keeps all of them, so a test can look up any id the native
buffer returns. ``ring_ids`` is what a deque of ``capacity`` would hold.

``EpisodeStreams`` makes what a vectorised env would hand a trainer: frame
stacks that shift by one frame per step, episodes of random lengths ending in
a termination or a truncation, start padding that repeats the reset frame,
is zero, or is arbitrary, and (optionally) surprising calls: an obs that does
not continue the stream, or a next_obs that is not obs shifted by a frame.
Frames are drawn from a small palette so equal consecutive frames are common.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ReferenceReplay:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.transitions: dict[int, tuple] = {}
        self.next_id = 0

    def add(self, obs, action, reward, next_obs, terminated, truncated):
        for e in range(len(obs)):
            self.transitions[self.next_id] = (
                np.array(obs[e]),
                np.array(action[e]),
                np.float32(reward[e]),
                np.array(next_obs[e]),
                bool(terminated[e]),
                bool(truncated[e]),
            )
            self.next_id += 1

    def ring_ids(self) -> range:
        """Ids a ring of `capacity` holds now (the most recent adds)."""
        return range(max(0, self.next_id - self.capacity), self.next_id)


def assert_batch_matches(batch, ref: ReferenceReplay, live: range | None = None):
    """Every sampled transition equals the reference's transition with that id."""
    to_np = lambda x: x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else np.asarray(x)
    obs, action, reward = to_np(batch.obs), to_np(batch.action), to_np(batch.reward)
    next_obs, term, trunc, ids = to_np(batch.next_obs), to_np(batch.terminated), to_np(batch.truncated), to_np(batch.ids)
    for i, tid in enumerate(ids.tolist()):
        if live is not None:
            assert tid in live, f"id {tid} is not among the stored ids {live}"
        r_obs, r_action, r_reward, r_next, r_term, r_trunc = ref.transitions[tid]
        np.testing.assert_array_equal(obs[i], r_obs, err_msg=f"obs of id {tid}")
        np.testing.assert_array_equal(next_obs[i], r_next, err_msg=f"next_obs of id {tid}")
        np.testing.assert_array_equal(action[i], r_action, err_msg=f"action of id {tid}")
        assert reward[i] == r_reward, f"reward of id {tid}"
        assert bool(term[i]) == r_term and bool(trunc[i]) == r_trunc, f"flags of id {tid}"


@dataclass
class StreamConfig:
    num_envs: int = 1
    frame_stack: int = 4
    frame_shape: tuple = (3, 5)
    dtype: type = np.uint8
    stack_axis: int = 0
    min_len: int = 1
    max_len: int = 20
    padding: str = "repeat"  # "repeat" | "zero" | "random"
    palette: int = 4  # distinct frame values (small: equal frames are common)
    p_glitch: float = 0.0  # obs does not continue the stream
    p_jump: float = 0.0  # next_obs is not obs shifted by one frame
    action_shape: tuple = ()


class EpisodeStreams:
    def __init__(self, cfg: StreamConfig, seed: int):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.obs = [self._reset() for _ in range(cfg.num_envs)]
        self.left = [self._length() for _ in range(cfg.num_envs)]
        self.episodes = cfg.num_envs

    def _frame(self):
        c = self.cfg
        v = self.rng.integers(0, c.palette, size=c.frame_shape)
        if np.dtype(c.dtype).kind == "f":
            return (v * 0.25 + self.rng.integers(0, 2)).astype(c.dtype)
        return v.astype(c.dtype)

    def _stack(self, frames):
        c = self.cfg
        if c.frame_stack == 1:
            return frames[0]
        return np.stack(frames, axis=-1 if c.stack_axis == -1 else 0)

    def _frames(self, obs):
        c = self.cfg
        if c.frame_stack == 1:
            return [obs]
        return [np.take(obs, j, axis=-1 if c.stack_axis == -1 else 0) for j in range(c.frame_stack)]

    def _reset(self):
        c = self.cfg
        first = self._frame()
        if c.padding == "repeat":
            pad = [first] * (c.frame_stack - 1)
        elif c.padding == "zero":
            pad = [np.zeros_like(first)] * (c.frame_stack - 1)
        else:
            pad = [self._frame() for _ in range(c.frame_stack - 1)]
        return self._stack(pad + [first])

    def _length(self):
        return int(self.rng.integers(self.cfg.min_len, self.cfg.max_len + 1))

    def step(self):
        """One lockstep add's arguments for all envs, then advance the streams."""
        c = self.cfg
        obs, next_obs, actions, rewards, terms, truncs = [], [], [], [], [], []
        for e in range(c.num_envs):
            o = self.obs[e]
            if self.rng.random() < c.p_glitch:
                o = self._reset()
            if self.rng.random() < c.p_jump:
                n = self._reset()
            else:
                n = self._stack(self._frames(o)[1:] + [self._frame()])
            self.left[e] -= 1
            done = self.left[e] <= 0
            term = done and bool(self.rng.random() < 0.5)
            trunc = done and not term
            obs.append(o)
            next_obs.append(n)
            actions.append(self.rng.integers(0, 6, size=c.action_shape))
            rewards.append(np.float32(self.rng.normal()))
            terms.append(term)
            truncs.append(trunc)
            if done:
                self.obs[e] = self._reset()
                self.left[e] = self._length()
                self.episodes += 1
            else:
                self.obs[e] = n
        return (
            np.stack(obs),
            np.array(actions, dtype=np.int64),
            np.array(rewards, dtype=np.float32),
            np.stack(next_obs),
            np.array(terms),
            np.array(truncs),
        )
