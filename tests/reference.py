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

``ReferenceReplay.nstep`` is the n-step return of a stored id, written from
the issue's rule, one transition at a time; ``ReferencePriorities`` is
proportional prioritized replay's state (raw priorities per stored id, the
max priority, P(i) and the importance weights) kept in plain dicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class ReferenceReplay:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.transitions: dict[int, tuple] = {}
        self.next_id = 0
        self.num_envs = None  # set by the first add (ids are add * num_envs + env)
        # follows[id]: the add's obs equalled its env's open stream (the previous
        # transition of that env, not ended, whose next_obs is bit-equal), so an
        # n-step window may run from that transition into this one.
        self.follows: dict[int, bool] = {}
        self._open: list = []  # per env: the open stream's bytes, None after an end

    def add(self, obs, action, reward, next_obs, terminated, truncated):
        if self.num_envs is None:
            self.num_envs = len(obs)
            self._open = [None] * self.num_envs
        for e in range(len(obs)):
            o, n = np.array(obs[e]), np.array(next_obs[e])
            self.follows[self.next_id] = self._open[e] is not None and o.tobytes() == self._open[e]
            self.transitions[self.next_id] = (
                o,
                np.array(action[e]),
                np.float32(reward[e]),
                n,
                bool(terminated[e]),
                bool(truncated[e]),
            )
            self._open[e] = None if terminated[e] or truncated[e] else n.tobytes()
            self.next_id += 1

    def window(self, tid: int, n: int, head: int | None = None) -> list:
        """The ids of `tid`'s n-step window: tid and its env's next transitions, at most n.

        It ends (inclusive) at a terminated or truncated transition, before a
        transition whose obs broke the stream, or at the env's newest add
        (the newest before id `head`, default all adds so far).
        """
        head = self.next_id if head is None else head
        ids = [tid]
        while len(ids) < n:
            last = ids[-1]
            *_, term, trunc = self.transitions[last]
            if term or trunc:
                break
            nxt = last + self.num_envs
            if nxt >= head or not self.follows[nxt]:
                break
            ids.append(nxt)
        return ids

    def nstep(self, tid: int, n: int, gamma: float, head: int | None = None) -> tuple:
        """(obs, action, reward, next_obs, terminated, truncated, discount) of `tid` with n-step returns."""
        ids = self.window(tid, n, head)
        acc, g = 0.0, 1.0  # float64, summed in window order
        for i in ids:
            acc += g * float(self.transitions[i][2])
            g *= gamma
        obs, action = self.transitions[tid][:2]
        _, _, _, next_obs, term, trunc = self.transitions[ids[-1]]
        return obs, action, np.float32(acc), next_obs, term, trunc, np.float32(g)

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


def assert_nstep_batch_matches(batch, ref: ReferenceReplay, n: int, gamma: float, live=None, weights_one=True):
    """Every row of an n-step batch equals ref.nstep of its id, field by field."""
    to_np = lambda x: x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else np.asarray(x)
    ids = to_np(batch.ids)
    assert ids.dtype == np.int64, f"ids must be int64, got {ids.dtype}"
    assert batch.discount is not None and batch.weights is not None, "an n-step batch has discount and weights"
    obs, action, reward, term, trunc = (to_np(x) for x in (batch.obs, batch.action, batch.reward, batch.terminated, batch.truncated))
    discount, weights = to_np(batch.discount), to_np(batch.weights)
    assert reward.dtype == discount.dtype == weights.dtype == np.float32, (reward.dtype, discount.dtype, weights.dtype)
    next_obs = None if batch.next_obs is None else to_np(batch.next_obs)
    for i, tid in enumerate(ids.tolist()):
        if live is not None:
            assert tid in live, f"id {tid} is not among the stored ids {live}"
        r_obs, r_action, r_reward, r_next, r_term, r_trunc, r_disc = ref.nstep(tid, n, gamma)
        where = f"id {tid} (window {ref.window(tid, n)}, n={n}, gamma={gamma!r})"
        np.testing.assert_array_equal(obs[i], r_obs, err_msg=f"obs of {where}")
        np.testing.assert_array_equal(action[i], r_action, err_msg=f"action of {where}")
        if next_obs is not None:
            np.testing.assert_array_equal(next_obs[i], r_next, err_msg=f"next_obs of {where}")
        assert reward[i] == r_reward, f"reward of {where}: expected {r_reward!r}, got {reward[i]!r}"
        assert discount[i] == r_disc, f"discount of {where}: expected {r_disc!r}, got {discount[i]!r}"
        assert (bool(term[i]), bool(trunc[i])) == (r_term, r_trunc), (
            f"flags of {where}: expected {(r_term, r_trunc)}, got {(bool(term[i]), bool(trunc[i]))}"
        )
        if weights_one:
            assert weights[i] == 1.0, f"weight of {where}: expected 1, got {weights[i]!r}"


class ReferencePriorities:
    """Proportional prioritized replay (Schaul et al. 2016) over the stored ids.

    P(i) = (p_i + eps)^alpha / sum_k (p_k + eps)^alpha; a new id gets the
    largest priority set so far (1.0 before any update); an update must be
    finite and >= 0 everywhere or nothing changes; ids no longer stored are
    ignored; with duplicate ids the last one wins.
    """

    def __init__(self, alpha: float, eps: float):
        self.alpha, self.eps = alpha, eps
        self.p: dict[int, float] = {}
        self.max_priority = 1.0

    def added(self, ids) -> None:
        for i in ids:
            self.p[int(i)] = self.max_priority

    def keep(self, live: range) -> None:
        """Forget the ids the buffer evicted (all but `live`)."""
        for i in [i for i in self.p if i not in live]:
            del self.p[i]

    def update(self, ids, priorities) -> None:
        ids = np.asarray(ids).reshape(-1).tolist()
        values = np.asarray(priorities, dtype=np.float64).reshape(-1)
        if len(ids) != len(values):
            raise ValueError(f"{len(ids)} ids but {len(values)} priorities")
        if not (np.isfinite(values).all() and (values >= 0).all()):
            raise ValueError("priorities must be finite and >= 0")
        for i, v in zip(ids, values.tolist()):
            if i in self.p:  # a stale id is ignored entirely
                self.p[i] = v
                self.max_priority = max(self.max_priority, v)

    def mass(self, i: int) -> float:
        return (self.p[i] + self.eps) ** self.alpha

    def probabilities(self, ids) -> np.ndarray:
        total = math.fsum(self.mass(i) for i in self.p)
        return np.array([self.mass(int(i)) / total for i in ids], dtype=np.float64)

    def weights(self, ids, beta: float) -> np.ndarray:
        """(N P(i))^-beta / max_j (N P(j))^-beta, in float64."""
        n = len(self.p)
        p_min = self.probabilities([min(self.p, key=self.mass)])[0]
        return (n * self.probabilities(ids)) ** -beta / (n * p_min) ** -beta


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
    drift: float = 0.0  # > 0: a step's new frame is the previous one with this share of elements redrawn
    # (consecutive frames then differ a little, like a game's: compressed stores code them as patches)


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

    def _next(self, prev):
        if self.cfg.drift <= 0:
            return self._frame()
        out = prev.copy()
        mask = self.rng.random(prev.shape) < self.cfg.drift
        out[mask] = self._frame()[mask]
        return out

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
                n = self._stack(self._frames(o)[1:] + [self._next(self._frames(o)[-1])])
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


def min_frame_memory(cfg: StreamConfig) -> int:
    """The smallest compressed arena a buffer of this config accepts: one add
    (2k coded frames per env, each at most a byte over raw) twice, plus one
    frame of slack at the wrap (see csrc/frame_arena.hpp)."""
    frame_bytes = int(np.prod(cfg.frame_shape)) * np.dtype(cfg.dtype).itemsize
    return (4 * cfg.num_envs * cfg.frame_stack + 1) * (frame_bytes + 1)


def compression_kwargs(cfg: StreamConfig, compression, extra_frames=None) -> dict:
    """Buffer kwargs for a codec; extra_frames: an arena only that many raw
    frames over the minimum (None: the default arena), so it fills before the
    ring does and evicts by bytes."""
    if compression is None:
        return {}
    if extra_frames is None:
        return {"compression": compression}
    frame_bytes = int(np.prod(cfg.frame_shape)) * np.dtype(cfg.dtype).itemsize
    return {"compression": compression, "frame_memory": min_frame_memory(cfg) + extra_frames * frame_bytes}
