"""Stable-Baselines3 drop-in: ``DQN(..., replay_buffer_class=dqn_fast.sb3.ReplayBuffer)``.

A subclass of SB3's ``ReplayBuffer`` (so SB3's off-policy algorithms, and
CleanRL scripts, which copy its interface, accept it) whose storage is the
native ``dqn_fast.ReplayBuffer``:

* Memory is always deduplicated: each frame of a frame-stacked observation is
  stored once, and each observation once (not twice as obs and next_obs).
  ``optimize_memory_usage`` is accepted and changes nothing.
* Time-limit truncations stay correct at the same time: the true final
  observation of every episode is kept, so ``handle_timeout_termination``
  works with ``optimize_memory_usage`` (which SB3 forbids, SB3 issue #934).
* Frame stacks (VecFrameStack, with or without VecTransposeImage) are
  detected from the observation space: a uint8 image space with c channels
  on its smallest axis holds c grayscale frames (c = 1 or 3: one frame).
  ``frame_stack=``/``stack_axis=`` in ``replay_buffer_kwargs`` override that
  (e.g. ``frame_stack=4`` for 4 stacked RGB frames, channel-first).
* Sampling draws from the native buffer's seeded PRNG (seeded from numpy's
  global RNG unless ``seed=`` is given, so SB3's ``seed`` makes runs
  reproducible), not from ``np.random``.

Not provided: SB3's raw arrays (``observations``, ``actions``, ...) and
``_get_samples``; sample through ``sample``. Dict observations need SB3's
DictReplayBuffer.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

try:
    from gymnasium import spaces
    from stable_baselines3.common.buffers import BaseBuffer
    from stable_baselines3.common.buffers import ReplayBuffer as SB3ReplayBuffer
    from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
    from stable_baselines3.common.type_aliases import ReplayBufferSamples
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dqn_fast.sb3 needs Stable-Baselines3: pip install 'dqn-fast[sb3]' (or stable-baselines3>=2.3)"
    ) from exc

from . import replay

__all__ = ["ReplayBuffer"]


class ReplayBuffer(SB3ReplayBuffer):
    """SB3's ReplayBuffer interface on the native frame-deduplicating buffer.

    Args are SB3's, plus keyword options (``replay_buffer_kwargs``):
        frame_stack: frames per observation (None: detect, see the module doc).
        stack_axis: 0 if frames are stacked on the first axis, -1 on the last.
        seed: sampling PRNG seed (None: drawn from ``np.random``).
        frame_reserve, sample_threads: as for ``dqn_fast.ReplayBuffer``.
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: Any = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        *,
        frame_stack: Optional[int] = None,
        stack_axis: Optional[int] = None,
        seed: Optional[int] = None,
        frame_reserve: float = replay.DEFAULT_FRAME_RESERVE,
        sample_threads: int = 0,
    ):
        # Not SB3ReplayBuffer.__init__: it allocates the full obs/next_obs
        # arrays that this class exists to avoid.
        BaseBuffer.__init__(self, buffer_size, observation_space, action_space, device, n_envs=n_envs)
        if isinstance(observation_space, spaces.Dict):
            raise TypeError("Dict observation spaces are not supported here: use SB3's DictReplayBuffer")
        self.buffer_size = max(buffer_size // n_envs, 1)
        self.optimize_memory_usage = optimize_memory_usage
        self.handle_timeout_termination = handle_timeout_termination
        self.obs_dtype = np.dtype(observation_space.dtype)
        self.action_dtype = np.dtype(self._maybe_cast_dtype(action_space.dtype))
        self.frame_stack, self.stack_axis, self._stored_shape = _frame_layout(
            observation_space, self.obs_shape, frame_stack, stack_axis
        )
        if seed is None:
            seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64))
        self._native_args = dict(
            capacity=self.buffer_size * n_envs,
            obs_shape=self._stored_shape,
            obs_dtype=self.obs_dtype,
            frame_stack=self.frame_stack,
            num_envs=n_envs,
            action_shape=(self.action_dim,),
            action_dtype=self.action_dtype,
            seed=seed,
            stack_axis=0 if self.stack_axis == 0 or len(self.obs_shape) == 1 else -1,
            frame_reserve=frame_reserve,
            sample_threads=sample_threads,
        )
        self.native = replay.ReplayBuffer(**self._native_args)

    @property
    def nbytes(self) -> int:
        """Bytes the native buffer allocated."""
        return self.native.nbytes

    def reset(self) -> None:
        super().reset()
        self.native = replay.ReplayBuffer(**self._native_args)

    def add(self, obs, next_obs, action, reward, done, infos) -> None:
        n = self.n_envs
        done = np.asarray(done, dtype=bool).reshape(n)
        if self.handle_timeout_termination:
            timeout = np.array([bool(info.get("TimeLimit.truncated", False)) for info in infos])
            terminated, truncated = done & ~timeout, done & timeout
        else:  # as SB3: every done is a termination
            terminated, truncated = done, np.zeros(n, dtype=bool)
        self.native.add(
            np.asarray(obs, dtype=self.obs_dtype).reshape(n, *self._stored_shape),
            np.asarray(action).reshape(n, self.action_dim),  # SB3 GH #970: any action shape
            np.asarray(reward, dtype=np.float32).reshape(n),
            np.asarray(next_obs, dtype=self.obs_dtype).reshape(n, *self._stored_shape),
            terminated,
            truncated,
        )
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True
            self.pos = 0

    def sample(self, batch_size: int, env=None) -> ReplayBufferSamples:
        b = self.native.sample(batch_size)
        data = (
            self._normalize_obs(b.obs.reshape(batch_size, *self.obs_shape), env),
            b.action,
            self._normalize_obs(b.next_obs.reshape(batch_size, *self.obs_shape), env),
            # terminated holds only real terminations when handle_timeout_termination
            # (every done otherwise), as SB3's dones * (1 - timeouts).
            b.terminated.astype(np.float32).reshape(-1, 1),
            self._normalize_reward(b.reward.reshape(-1, 1), env),
        )
        # The arrays are fresh: no copy needed on the CPU.
        return ReplayBufferSamples(*(self.to_torch(x, copy=False) for x in data))

    def _get_samples(self, batch_inds, env=None):
        raise NotImplementedError("dqn_fast.sb3.ReplayBuffer samples through sample(); it has no row indices")

    @property
    def dones(self):
        # SB3 marks the last stored transition done when learn() restarts with
        # optimize_memory_usage (SB3 issue #46): its next_obs would otherwise be
        # the new episode's first obs. Here every next_obs is stored as it was,
        # so that mark is not needed, and it is dropped.
        return _IgnoredMarks()

    def __repr__(self) -> str:
        return (
            f"dqn_fast.sb3.ReplayBuffer(buffer_size={self.buffer_size}, n_envs={self.n_envs}, "
            f"frame_stack={self.frame_stack}, size={self.size()}, native={self.native!r})"
        )


class _IgnoredMarks:
    def __setitem__(self, index, value) -> None:
        pass


def _frame_layout(space: spaces.Space, shape: tuple, frame_stack: Optional[int], stack_axis: Optional[int]):
    """(frame_stack, stack_axis, shape the native buffer stores obs in).

    VecFrameStack concatenates frames along the channel axis (first or last),
    so a stack of k frames with c channels each is a free reshape for the
    native buffer: channel-first (k*c, H, W) -> (k, c, H, W), channel-last
    (H, W, k) as it is, vectors (k*d,) -> (k, d).
    """
    image = is_image_space(space)
    if stack_axis is None:
        stack_axis = 0 if image and is_image_space_channels_first(space) else -1
    if stack_axis not in (0, -1):
        raise ValueError(f"stack_axis must be 0 or -1, got {stack_axis!r}")
    channels = shape[stack_axis]
    if frame_stack is None:
        frame_stack = channels if image and channels not in (1, 3) else 1
    if not isinstance(frame_stack, int) or frame_stack < 1 or channels % frame_stack:
        raise ValueError(
            f"frame_stack={frame_stack!r} does not divide the {channels} channels of {shape} on axis {stack_axis}"
        )
    per_frame = channels // frame_stack
    if frame_stack == 1:
        return 1, stack_axis, shape
    if stack_axis == 0:
        return frame_stack, 0, (frame_stack, *((per_frame,) if per_frame > 1 else ()), *shape[1:])
    if len(shape) == 1:
        return frame_stack, -1, (frame_stack, per_frame)
    if per_frame > 1:
        raise ValueError(
            f"channel-last stacks of {per_frame}-channel frames {shape} are not supported: "
            "transpose them (VecTransposeImage) or pass frame_stack=1"
        )
    return frame_stack, -1, shape
