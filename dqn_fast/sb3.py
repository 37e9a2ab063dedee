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
* n-step returns: ``replay_buffer_kwargs=dict(n_steps=3, gamma=...)``, as for
  SB3's ``NStepReplayBuffer``: samples carry ``discounts`` (gamma**m, m the
  window length) and SB3's DQN bootstraps with them. SB3 hands its own
  ``n_steps=`` argument only to its own classes; this buffer warns when it
  is built by an algorithm whose ``n_steps`` it did not get.
* Frame stacks (VecFrameStack, with or without VecTransposeImage) are
  detected from the observation space: a uint8 image space with c channels
  on its smallest axis holds c grayscale frames (c = 1 or 3: one frame).
  ``frame_stack=``/``stack_axis=`` in ``replay_buffer_kwargs`` override that
  (e.g. ``frame_stack=4`` for 4 stacked RGB frames, channel-first).
* Sampling draws from the native buffer's seeded PRNG (seeded from numpy's
  global RNG unless ``seed=`` is given, so SB3's ``seed`` makes runs
  reproducible), not from ``np.random``. ``_get_samples(batch_inds)`` (SB3's
  row indices, env drawn from ``np.random`` as SB3 does) and
  ``get_samples(batch_inds, env_indices)`` read given rows instead.
* SB3's arrays (``observations``, ``next_observations``, ``actions``,
  ``rewards``, ``dones``, ``timeouts``) are read-only properties in SB3's
  layout; see ``ReplayBuffer.observations`` for what they cost.

Dict observations need SB3's DictReplayBuffer.
"""

from __future__ import annotations

import numbers
import sys
import warnings
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

# Transitions per native get while assembling an array property: bounds the
# temporary batch to this many obs + next_obs (~ 56 MB for Atari frames).
_ASSEMBLE_CHUNK = 1024


class ReplayBuffer(SB3ReplayBuffer):
    """SB3's ReplayBuffer interface on the native frame-deduplicating buffer.

    Args are SB3's, plus keyword options (``replay_buffer_kwargs``):
        n_steps: transitions summed into one sampled return (1: one-step, as
            SB3's ReplayBuffer; > 1: as SB3's NStepReplayBuffer, with
            ``discounts`` in the samples).
        gamma: discount of the n-step return; give the model's gamma (SB3
            does not pass it to a custom buffer class either).
        frame_stack: frames per observation (None: detect, see the module doc).
        stack_axis: 0 if frames are stacked on the first axis, -1 on the last.
        seed: sampling PRNG seed (None: drawn from ``np.random``).
        frame_reserve, sample_threads: as for ``dqn_fast.ReplayBuffer``.
        compression, frame_memory: the compressed frame store ("lz4" or
            "zstd", and the bytes its frames may take), as for
            ``dqn_fast.ReplayBuffer``.
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
        n_steps: int = 1,
        gamma: float = 0.99,
        frame_stack: Optional[int] = None,
        stack_axis: Optional[int] = None,
        seed: Optional[int] = None,
        frame_reserve: float = replay.DEFAULT_FRAME_RESERVE,
        sample_threads: int = 0,
        compression: Optional[str] = None,
        frame_memory: Optional[int] = None,
    ):
        # Not SB3ReplayBuffer.__init__: it allocates the full obs/next_obs
        # arrays that this class exists to avoid.
        BaseBuffer.__init__(self, buffer_size, observation_space, action_space, device, n_envs=n_envs)
        if isinstance(observation_space, spaces.Dict):
            raise TypeError("Dict observation spaces are not supported here: use SB3's DictReplayBuffer")
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral):
            raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}")
        if n_steps < 1:
            raise ValueError(f"n_steps must be at least 1, got {n_steps}")
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
            raise TypeError(f"gamma must be a float, got {type(gamma).__name__}")
        if not 0 <= gamma <= 1:  # also NaN
            raise ValueError(f"gamma must be between 0 and 1, got {gamma!r}")
        if n_steps > 1 and "discounts" not in ReplayBufferSamples._fields:
            raise ValueError(f"n_steps={n_steps} needs SB3 >= 2.7 (ReplayBufferSamples.discounts)")
        self.n_steps, self.gamma = int(n_steps), float(gamma)
        _warn_if_the_algorithm_meant_otherwise(self.n_steps, self.gamma)
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
            compression=compression,
            frame_memory=frame_memory,
        )
        if self.n_steps > 1:
            self._native_args.update(n_step=self.n_steps, gamma=self.gamma)
        self.native = replay.ReplayBuffer(**self._native_args)
        self._small_arrays()

    def _small_arrays(self) -> None:
        # SB3's per-transition scalars and actions, in SB3's slots (~20 bytes
        # a transition): the array properties read them without a gather,
        # and the one-step rewards of an n-step buffer are only kept here.
        shape = (self.buffer_size, self.n_envs)
        self._actions = np.zeros((*shape, self.action_dim), dtype=self.action_dtype)
        self._rewards = np.zeros(shape, dtype=np.float32)
        self._dones = np.zeros(shape, dtype=np.float32)
        self._timeouts = np.zeros(shape, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes the native buffer allocated (plus ~20 per transition of SB3-layout scalars, not counted)."""
        return self.native.nbytes

    def reset(self) -> None:
        super().reset()
        self.native = replay.ReplayBuffer(**self._native_args)
        self._small_arrays()

    def add(self, obs, next_obs, action, reward, done, infos) -> None:
        n = self.n_envs
        done = np.asarray(done, dtype=bool).reshape(n)
        if self.handle_timeout_termination:
            timeout = np.array([bool(info.get("TimeLimit.truncated", False)) for info in infos])
            terminated, truncated = done & ~timeout, done & timeout
        else:  # as SB3: every done is a termination
            timeout = np.zeros(n, dtype=bool)
            terminated, truncated = done, timeout
        action = np.asarray(action).reshape(n, self.action_dim)  # SB3 GH #970: any action shape
        reward = np.asarray(reward, dtype=np.float32).reshape(n)
        self.native.add(
            np.asarray(obs, dtype=self.obs_dtype).reshape(n, *self._stored_shape),
            action,
            reward,
            np.asarray(next_obs, dtype=self.obs_dtype).reshape(n, *self._stored_shape),
            terminated,
            truncated,
        )
        self._actions[self.pos] = action
        self._rewards[self.pos] = reward
        self._dones[self.pos] = done
        self._timeouts[self.pos] = timeout
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True
            self.pos = 0

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, env=None) -> ReplayBufferSamples:
        return self._samples(self.native.sample(batch_size), env)

    def _get_samples(self, batch_inds: np.ndarray, env=None) -> ReplayBufferSamples:
        """SB3's rows ``batch_inds``, each of an env drawn from ``np.random`` (the same draw SB3 makes)."""
        env_indices = np.random.randint(0, high=self.n_envs, size=np.shape(batch_inds))
        return self.get_samples(batch_inds, env_indices, env)

    def get_samples(self, batch_inds, env_indices, env=None) -> ReplayBufferSamples:
        """The stored transitions at SB3's (row, env) slots, as ``sample`` returns them.

        With n_steps > 1 they are n-step samples, as SB3's NStepReplayBuffer
        makes them. ``ValueError`` for a slot not written yet, or whose
        transition the native buffer no longer holds (see ``transition_ids``).
        """
        return self._samples(self.native.get(self.transition_ids(batch_inds, env_indices)), env)

    def transition_ids(self, batch_inds, env_indices=0) -> np.ndarray:
        """Native transition ids of SB3's slots ``[batch_inds, env_indices]`` (broadcast together).

        Row ``pos - 1`` holds the newest add, as in SB3. Ids of slots whose
        transition was dropped early (a frame reserve too small for very
        short episodes, see ``dqn_fast.ReplayBuffer``) are returned too; the
        native ``get`` rejects them.
        """
        rows, envs = (np.asarray(x) for x in (batch_inds, env_indices))
        for name, x, end in (("batch_inds", rows, self.buffer_size), ("env_indices", envs, self.n_envs)):
            if x.dtype.kind not in "iu":
                raise TypeError(f"{name} must be integers, got dtype {x.dtype}")
            if x.size and (x.min() < 0 or x.max() >= end):
                raise ValueError(f"{name} must be in [0, {end}), got values from {x.min()} to {x.max()}")
        rows, envs = np.broadcast_arrays(rows.astype(np.int64), envs.astype(np.int64))
        steps = self._add_of_row(rows)
        if steps.size and steps.min() < 0:
            raise ValueError(f"row {rows[steps < 0].flat[0]} has not been written yet (size() is {self.size()})")
        return steps * self.n_envs + envs

    def _samples(self, b, env) -> ReplayBufferSamples:
        batch_size = len(b.ids)
        data = [
            self._normalize_obs(b.obs.reshape(batch_size, *self.obs_shape), env),
            b.action,
            self._normalize_obs(b.next_obs.reshape(batch_size, *self.obs_shape), env),
            # terminated holds only real terminations when handle_timeout_termination
            # (every done otherwise), as SB3's dones * (1 - timeouts).
            b.terminated.astype(np.float32).reshape(-1, 1),
            # n-step: the window's return is normalized as a whole. SB3's
            # NStepReplayBuffer normalizes each reward first: the same unless
            # VecNormalize's reward clipping cuts one of them.
            self._normalize_reward(b.reward.reshape(-1, 1), env),
        ]
        if self.n_steps > 1:  # SB3's one-step buffer sends no discounts (DQN then uses its gamma)
            data.append(b.discount.reshape(-1, 1))
        # The arrays are fresh: no copy needed on the CPU.
        return ReplayBufferSamples(*(self.to_torch(x, copy=False) for x in data))

    # ------------------------------------------------------ SB3's arrays, read-only
    @property
    def observations(self) -> np.ndarray:
        """SB3's ``observations``: (buffer_size, n_envs, *obs_shape), read-only, built on each access.

        Each access gathers every stored observation from the native buffer
        into a new array as large as SB3's own (buffer_size * n_envs obs:
        28 GB for 1M Atari transitions), in chunks, with a time proportional
        to the buffer: keep the array while you read it, or use
        ``get_samples``/``rb.native.get`` for a few transitions. Slots not
        written yet, or whose transition was dropped early, are zeros.
        With ``optimize_memory_usage`` SB3's own array also holds the newest
        next_obs at row ``pos``; here each row holds its own obs, and
        ``next_observations`` is always there.
        """
        return self._assemble(next_obs=False)

    @property
    def next_observations(self) -> np.ndarray:
        """SB3's ``next_observations`` (one-step, also for n_steps > 1); the same cost as ``observations``.

        With n_steps > 1 they are read from window rows (``get(window=True)``),
        which frame-stacked transitions whose next_obs is not their obs
        shifted by one frame cannot give: those raise ``ValueError``.
        """
        return self._assemble(next_obs=True)

    @property
    def actions(self) -> np.ndarray:
        """SB3's ``actions``: (buffer_size, n_envs, action_dim), a read-only view (kept here, no gather)."""
        return self._small(self._actions)

    @property
    def rewards(self) -> np.ndarray:
        """SB3's ``rewards``: (buffer_size, n_envs) float32 one-step rewards, a read-only view."""
        return self._small(self._rewards)

    @property
    def timeouts(self) -> np.ndarray:
        """SB3's ``timeouts``: 1.0 where an add's info said ``TimeLimit.truncated``, a read-only view.

        All zeros without ``handle_timeout_termination``, as in SB3.
        """
        return self._small(self._timeouts)

    @property
    def dones(self) -> np.ndarray:
        """SB3's ``dones``: 1.0 for every done (terminated or truncated), a read-only view.

        SB3 marks the last stored transition done when learn() restarts with
        optimize_memory_usage (SB3 issue #46): its next_obs would otherwise
        be the new episode's first obs. Here every next_obs is stored as it
        was, and the new episode's obs breaks the stream (n-step windows end
        there), so that one write is accepted and dropped; any other write
        raises, as for every array here.
        """
        dones = self._small(self._dones).view(_Dones)
        dones._mark_row = (self.pos - 1) % self.buffer_size
        return dones

    def _add_of_row(self, rows: np.ndarray) -> np.ndarray:
        """Index of the add (SB3 step) that filled each row: the newest at or before row pos - 1; < 0: none yet."""
        return self.native.total_adds // self.n_envs - 1 - (self.pos - 1 - rows) % self.buffer_size

    def _stored_slots(self) -> np.ndarray:
        """(buffer_size, n_envs) bool: the slots whose transition the native buffer holds."""
        steps = self._add_of_row(np.arange(self.buffer_size))[:, None]
        ids = steps * self.n_envs + np.arange(self.n_envs)[None, :]
        return (steps >= 0) & (ids >= self.native.total_adds - len(self.native))

    def _small(self, array: np.ndarray) -> np.ndarray:
        if len(self.native) != self.size() * self.n_envs:  # some dropped early: zeros, as in observations
            stored = self._stored_slots().reshape(array.shape[:2] + (1,) * (array.ndim - 2))
            array = np.where(stored, array, np.zeros((), array.dtype))
        view = array.view()
        view.flags.writeable = False
        return view

    def _assemble(self, next_obs: bool) -> np.ndarray:
        out = np.zeros((self.buffer_size, self.n_envs, *self.obs_shape), dtype=self.obs_dtype)
        flat = out.reshape(self.buffer_size * self.n_envs, *self.obs_shape)
        slots = np.flatnonzero(self._stored_slots())
        ids = self.transition_ids(slots // self.n_envs, slots % self.n_envs)
        k, window = self.frame_stack, next_obs and self.n_steps > 1
        for start in range(0, len(ids), _ASSEMBLE_CHUNK):
            part = slice(start, start + _ASSEMBLE_CHUNK)
            # An n-step batch's next_obs is its window's end; a window row
            # holds every step's newest frame, so frames 1..k are the one-step next_obs.
            b = self.native.get(ids[part], window=window)
            if not window:
                rows = b.next_obs if next_obs else b.obs
            elif k == 1:
                rows = b.frames[:, 1]
            elif self.native.stack_last:
                rows = b.frames[..., 1 : 1 + k]
            else:
                rows = b.frames[:, 1 : 1 + k]
            flat[slots[part]] = rows.reshape(len(rows), *self.obs_shape)
        out.flags.writeable = False
        return out

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        if "_rewards" not in state:  # pickled before the arrays were kept: one-step, rebuild them
            self.n_steps, self.gamma = 1, 0.99
            self._small_arrays()
            slots = np.flatnonzero(self._stored_slots())
            if len(slots):
                rows, envs = slots // self.n_envs, slots % self.n_envs
                b = self.native.get(self.transition_ids(rows, envs))
                self._actions[rows, envs] = b.action
                self._rewards[rows, envs] = b.reward
                self._dones[rows, envs] = b.terminated | b.truncated
                self._timeouts[rows, envs] = b.truncated

    def __repr__(self) -> str:
        return (
            f"dqn_fast.sb3.ReplayBuffer(buffer_size={self.buffer_size}, n_envs={self.n_envs}, "
            f"n_steps={self.n_steps}, frame_stack={self.frame_stack}, size={self.size()}, native={self.native!r})"
        )


class _Dones(np.ndarray):
    """A read-only ``dones`` that accepts (and drops) SB3's issue-#46 mark of the newest row."""

    _mark_row: Optional[int] = None

    def __array_finalize__(self, obj) -> None:
        self._mark_row = None  # views and results of it are plain read-only arrays

    def __setitem__(self, index, value) -> None:
        if (
            self._mark_row is not None
            and isinstance(index, numbers.Integral)
            and int(index) == self._mark_row
            and np.all(np.asarray(value) == 1)
        ):
            return
        super().__setitem__(index, value)


def _warn_if_the_algorithm_meant_otherwise(n_steps: int, gamma: float) -> None:
    """Warn when an SB3 algorithm builds this buffer with other n-step settings than its own.

    SB3 passes ``n_steps``/``gamma`` only to its own NStepReplayBuffer, so
    ``DQN(..., n_steps=3, replay_buffer_class=this)`` would train one-step
    returns. The algorithm is the ``self`` of the frame that calls the class
    (its ``_setup_model``); best effort, nothing is changed.
    """
    try:
        from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
    except ImportError:  # pragma: no cover - every SB3 2.x has it
        return
    try:
        frame = sys._getframe(2)
    except ValueError:  # called from the top of the stack
        return
    for _ in range(4):  # a subclass's __init__ may sit in between
        if frame is None:
            return
        algo = frame.f_locals.get("self")
        if isinstance(algo, OffPolicyAlgorithm):
            wanted = int(getattr(algo, "n_steps", 1))
            if wanted != 1 and wanted != n_steps:
                warnings.warn(
                    f"{type(algo).__name__}(n_steps={wanted}) does not reach dqn_fast.sb3.ReplayBuffer: SB3 passes "
                    f"n_steps only to its own NStepReplayBuffer, so this buffer samples {n_steps}-step returns. "
                    f"Use replay_buffer_kwargs=dict(n_steps={wanted}, gamma={algo.gamma}).",
                    UserWarning,
                    stacklevel=4,
                )
            elif n_steps > 1 and gamma != algo.gamma:
                warnings.warn(
                    f"replay_buffer_kwargs has gamma={gamma} (n_steps={n_steps}) but {type(algo).__name__} has "
                    f"gamma={algo.gamma}: the n-step returns and their discounts use {gamma}",
                    UserWarning,
                    stacklevel=4,
                )
            return
        frame = frame.f_back


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
