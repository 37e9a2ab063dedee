"""Real Atari frames for the compression benchmark (bench/compression.py).

Compression depends on what the frames look like, so this benchmark does
not use the synthetic streams of bench/streams.py: it records real games
with ale-py (its ROMs ship with it) and replays the recordings into every
buffer as transitions.

Recording: `ALE/<game>-v5` with frameskip=1 and no sticky actions, wrapped
in gymnasium's AtariPreprocessing (frame skip 4 with the max-pool over the
last two frames, 84x84 grayscale, up to 30 no-ops at reset, full games: a
lost life does not end the episode), and a stack of 4 frames kept here, the
reset frame repeated as padding (what gymnasium's FrameStackObservation
does). Policy: no network is at hand, so actions are uniform random
(`numpy.random.default_rng(seed)`), the env reset with `seed` once and its
own generator continuing through later resets; a recording is therefore the
same for the same game, length, seed and ale-py version. A random policy
sees less of a game than a trained agent (Pong's paddle moves at random,
Breakout rarely clears bricks), so treat the compression ratios as this
workload's, not every agent's.

A recording stores each frame once, `frames` (F, 84, 84) uint8: every
episode's reset frame, then the new frame of each step. Per step t:
`frame[t]` is the index of next_obs's newest frame (obs's newest is
frame[t] - 1), `start[t]` the index of its episode's reset frame, and the
step's action, reward, terminated and truncated. A stack is rebuilt from
its newest frame as frames[max(start, newest - 3) ... newest]. The
recording's last step is marked truncated when it did not terminate (the
episode was cut there), so a replay can loop: after the last step the first
step's obs follows, which is a reset.

Recordings are cached as .npz files in `<out_dir>/atari-frames/` (named
`<game>-<steps>-seed<seed>.npz`) and reused by later runs.

`RecordedEnvs` replays a recording like the lockstep envs of
bench/streams.py: `step()` returns (obs, action, reward, next_obs,
terminated, truncated) for `num_envs` envs, each env replaying the recording
in order from its own offset, looping for as many transitions as asked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

GAMES = ("Pong", "Breakout", "MsPacman", "Seaquest")
FRAME = (84, 84)
K = 4
POLICY = ("uniform random actions from numpy.random.default_rng(seed); the env reset with seed once, "
          "later resets continue its own generator")
FORMAT = 1  # bump when the cached file's layout changes


@dataclass
class Recording:
    game: str
    seed: int
    frames: np.ndarray  # (F, 84, 84) uint8, each frame once
    frame: np.ndarray  # (steps,) int64: next_obs's newest frame
    start: np.ndarray  # (steps,) int64: the episode's reset frame
    action: np.ndarray  # (steps,) int64
    reward: np.ndarray  # (steps,) float32
    terminated: np.ndarray  # (steps,) bool
    truncated: np.ndarray  # (steps,) bool
    meta: Optional[dict] = None

    @property
    def steps(self) -> int:
        return len(self.frame)

    @property
    def episodes(self) -> int:
        """Episodes begun (the last one cut by the recording's end counts)."""
        return int(np.count_nonzero(self.terminated | self.truncated))

    def stack_index(self, newest: np.ndarray, start: np.ndarray, k: int = K) -> np.ndarray:
        """(..., k) frame indices of the stacks whose newest frames are `newest`."""
        offsets = np.arange(-(k - 1), 1)
        return np.maximum(np.asarray(start)[..., None], np.asarray(newest)[..., None] + offsets)

    def obs_index(self, k: int = K) -> np.ndarray:
        """(steps, k): the frames of each step's obs."""
        return self.stack_index(self.frame - 1, self.start, k)

    def next_index(self, k: int = K) -> np.ndarray:
        """(steps, k): the frames of each step's next_obs."""
        return self.stack_index(self.frame, self.start, k)

    def indices(self, k: int = K):
        """(obs_index, next_index), computed once per recording: a replay built
        later (after a memory baseline) allocates nothing that lasts."""
        cache = self.__dict__.setdefault("_indices", {})
        if k not in cache:
            cache[k] = (self.obs_index(k), self.next_index(k))
        return cache[k]


def cache_path(out_dir: str, game: str, steps: int, seed: int) -> str:
    return os.path.join(out_dir, "atari-frames", f"{game}-{steps}-seed{seed}.npz")


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("ale-py", "gymnasium"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def make_env(game: str):
    """The recording env: ALE/<game>-v5 without frame skip or sticky actions, in AtariPreprocessing."""
    import ale_py
    import gymnasium as gym
    from gymnasium.wrappers import AtariPreprocessing

    gym.register_envs(ale_py)
    env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0)
    return AtariPreprocessing(env, frame_skip=4, screen_size=FRAME[0], grayscale_obs=True, noop_max=30)


def record(game: str, steps: int, seed: int = 0) -> Recording:
    """`steps` env steps of `game` under the seeded random policy (see the module docstring)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    env = make_env(game)
    try:
        rng = np.random.default_rng(seed)
        n_actions = int(env.action_space.n)
        frames = np.empty((steps + 1 + steps // 2 + 16, *FRAME), np.uint8)  # grown below if episodes are short
        nframes = 0

        def push(obs) -> int:
            nonlocal frames, nframes
            if nframes == len(frames):
                frames = np.concatenate([frames, np.empty_like(frames)])
            frames[nframes] = obs  # a copy: the wrapper may reuse its array
            nframes += 1
            return nframes - 1

        frame = np.empty(steps, np.int64)
        start = np.empty(steps, np.int64)
        action = rng.integers(0, n_actions, size=steps).astype(np.int64)
        reward = np.empty(steps, np.float32)
        terminated = np.zeros(steps, bool)
        truncated = np.zeros(steps, bool)
        obs, _ = env.reset(seed=seed)
        first = push(obs)
        for t in range(steps):
            obs, r, term, trunc, _ = env.step(int(action[t]))
            frame[t], start[t], reward[t] = push(obs), first, r
            terminated[t], truncated[t] = term, trunc
            if term or trunc:
                if t + 1 < steps:
                    obs, _ = env.reset()
                    first = push(obs)
        if not terminated[-1]:
            truncated[-1] = True  # the recording cut the episode: a loop starts a new one
    finally:
        env.close()
    meta = {"format": FORMAT, "game": game, "steps": steps, "seed": seed, "policy": POLICY,
            "n_actions": n_actions, "versions": _versions()}
    return Recording(game, seed, frames[:nframes].copy(), frame, start, action, reward, terminated, truncated, meta)


def save(rec: Recording, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez_compressed(tmp, frames=rec.frames, frame=rec.frame, start=rec.start, action=rec.action, reward=rec.reward,
                        terminated=rec.terminated, truncated=rec.truncated, meta=np.array(json.dumps(rec.meta)))
    os.replace(tmp, path)  # whole files only, even with several writers


def load(path: str) -> Recording:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: recording format {meta.get('format')}, expected {FORMAT}")
        return Recording(meta["game"], meta["seed"], z["frames"], z["frame"], z["start"], z["action"], z["reward"],
                         z["terminated"], z["truncated"], meta)


def recording(game: str, steps: int, seed: int = 0, out_dir: Optional[str] = "bench-results", log=None) -> Recording:
    """The cached recording if there is one (and it is readable), else a new one, saved."""
    if out_dir is None:
        return record(game, steps, seed)
    path = cache_path(out_dir, game, steps, seed)
    if os.path.exists(path):
        try:
            rec = load(path)
            if rec.steps == steps and rec.game == game and rec.seed == seed:
                return rec
        except Exception as exc:  # a broken or old file is recorded again
            if log:
                log(f"  {path}: {type(exc).__name__}: {exc}; recording again")
    rec = record(game, steps, seed)
    save(rec, path)
    if log:
        log(f"  recorded {game}: {steps:,} steps, {rec.episodes} episodes, {len(rec.frames):,} frames -> {path}")
    return rec


def concat(recs: Sequence[Recording]) -> Recording:
    """The recordings back to back, as one (each ends with a terminated or truncated step)."""
    if len(recs) == 1:
        return recs[0]
    frames, frame, start, base = [], [], [], 0
    for r in recs:
        frames.append(r.frames)
        frame.append(r.frame + base)
        start.append(r.start + base)
        base += len(r.frames)
    cat = lambda name: np.concatenate([getattr(r, name) for r in recs])  # noqa: E731
    meta = {"format": FORMAT, "parts": [r.meta for r in recs]}
    return Recording("+".join(r.game for r in recs), recs[0].seed, np.concatenate(frames), np.concatenate(frame),
                     np.concatenate(start), cat("action"), cat("reward"), cat("terminated"), cat("truncated"), meta)


class RecordedEnvs:
    """`num_envs` lockstep envs replaying `rec` in order, each from its own
    offset (env e starts at step offset + e * steps // num_envs), looping.
    An env that starts mid-episode starts with that step's real stack.
    Every step hands out fresh arrays, and the obs of step t+1 is the
    next_obs array of step t where no episode ended (as a gymnasium loop
    holds them); where one ended, a copy with that env's reset stack."""

    def __init__(self, rec: Union[Recording, List[Recording]], num_envs: int = 1, offset: int = 0, k: int = K):
        self.rec = concat(rec) if isinstance(rec, (list, tuple)) else rec
        self.n, self.k = num_envs, k
        steps = self.rec.steps
        self.pos = (offset + np.arange(num_envs) * (steps // num_envs)) % steps
        self._obs_idx, self._next_idx = self.rec.indices(k)
        self.frames = self.rec.frames
        self.obs = self.frames[self._obs_idx[self.pos]]
        self.produced = 0

    @property
    def obs_shape(self) -> tuple:
        return (self.k, *self.frames.shape[1:])

    def step(self):
        """(obs, action, reward, next_obs, terminated, truncated), each (num_envs, ...)."""
        rec, i = self.rec, self.pos
        obs = self.obs
        nxt = self.frames[self._next_idx[i]]
        terminated, truncated = rec.terminated[i], rec.truncated[i]  # fancy indexing: fresh arrays
        action, reward = rec.action[i], rec.reward[i]
        self.pos = (i + 1) % rec.steps
        done = terminated | truncated
        if done.any():
            nxt_obs = nxt.copy()  # next_obs stays the true final obs
            ended = np.flatnonzero(done)
            nxt_obs[ended] = self.frames[self._obs_idx[self.pos[ended]]]
            self.obs = nxt_obs
        else:
            self.obs = nxt
        self.produced += self.n
        return obs, action, reward, nxt, terminated, truncated


def transitions(rec: Union[Recording, List[Recording]], n: int, num_envs: int = 1, offset: int = 0):
    """Yields steps of `num_envs` envs until `n` transitions (rounded up to whole steps) were produced."""
    envs = RecordedEnvs(rec, num_envs, offset)
    for _ in range(-(-n // num_envs)):
        yield envs.step()
