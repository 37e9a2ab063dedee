"""Python face of the native replay buffer (``dqn_fast._core``).

What the buffer promises (checked against ``tests/reference.py``):

* Every sampled transition is bit-exactly what was added for its insertion
  id: obs, action, reward, next_obs, terminated, truncated. That includes the
  first k-1 steps of an episode (their padding is whatever the caller's obs
  held) and the last step of a terminated or truncated episode (its real
  final next_obs, not the next episode's reset obs).
* Each environment frame is stored once. Stacks are rebuilt at sample time.
* The buffer never trusts the caller's bookkeeping: an add whose obs does not
  equal the env's stored stream starts a new segment. Surprising streams cost
  memory, never correctness.
* The stored transitions are always the most recent ``len(buf)`` adds.
  ``len(buf) == min(adds, capacity)`` unless very short episodes exhaust the
  frame reserve (``frame_reserve``); then the oldest go early.
* Sampling is uniform with replacement, from a seeded per-buffer PRNG in C++.
* ``add`` and ``sample_into`` release the GIL; they may run on different
  threads at once.
* Bad input raises ``TypeError`` / ``ValueError`` (``MemoryError`` for sizes
  that cannot be backed, ``ReplayFileError`` for files) and changes nothing;
  the README's "What the buffer guarantees" lists them per entry point.
* ``save``/``load`` write and read the whole state (frames, index, counters,
  PRNG), so a loaded buffer samples and adds exactly as the saved one would
  have. The file format and its checks are in ``dqn_fast/replay_file.py``.
"""

from __future__ import annotations

import math
import numbers
import secrets
import sys
import threading
from typing import Any, NamedTuple, Optional, Tuple

import numpy as np

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - depends on how it was installed
    raise ImportError(
        "dqn_fast's native core (dqn_fast._core) is not built here. Install the package with "
        "`pip install .` and import it from outside the source tree (this error also appears "
        f"when the source folder shadows the installed package): {exc}"
    ) from exc

from . import replay_file  # noqa: E402 - needs _core
from .replay_file import ReplayFileError  # noqa: E402

__all__ = ["Batch", "ReplayBuffer", "ReplayFileError"]

# Default share of extra frame slots for episode starts. An episode start
# stores one extra frame with reset padding, two with zero padding; 4.4%
# covers episodes of 50+ steps and keeps nbytes under 7,056 x 1.05 + 16 bytes
# per Atari transition.
DEFAULT_FRAME_RESERVE = 0.044


class Batch(NamedTuple):
    """One sampled batch. Fields are numpy arrays or CPU torch tensors.

    In window mode ``frames`` holds k+1 frames per transition and ``obs`` /
    ``next_obs`` are views of it (frames[:, :k] and frames[:, 1:]).
    """

    obs: Any
    action: Any
    reward: Any
    next_obs: Any
    terminated: Any
    truncated: Any
    ids: Any
    frames: Any = None


def _shape(value, name: str) -> Tuple[int, ...]:
    if isinstance(value, numbers.Integral):
        value = (value,)
    try:
        shape = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints, got {type(value).__name__}") from None
    if len(shape) > _MAX_DIMS:
        raise ValueError(f"{name} must have at most {_MAX_DIMS} dimensions, got {len(shape)}")
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in shape):
        raise TypeError(f"{name} must be a tuple of ints, got {shape}")
    if not all(1 <= d < 2**63 for d in shape):
        raise ValueError(f"{name} must be a tuple of positive ints below 2**63, got {shape}")
    return tuple(int(d) for d in shape)


def _dtype(value, name: str) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a numpy dtype, got {value!r}") from None
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a bool, integer or float dtype, got {dtype}")
    if not dtype.isnative:
        raise TypeError(f"{name} must be in native byte order, got {dtype.str} ({dtype.byteorder!r})")
    return dtype


def _int(value, name: str, what: str = "an int") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return int(value)


def _positive_int(value, name: str, most: int = 2**63 - 1) -> int:
    value = _int(value, name)
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    if value > most:
        raise ValueError(f"{name} must be at most {most}, got {value}")
    return value


_VIEW_CACHE = 4
_MAX_DIMS = 32  # numpy allows 64, and a batch adds one


def _layouts(tensors) -> list:
    return [(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors]


def _writable_array(x, name: str):
    """numpy view of an output field (torch CPU tensors share their memory)."""
    if isinstance(x, np.ndarray):
        return x
    torch = sys.modules.get("torch")  # a tensor means torch is imported already
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise TypeError(f"out.{name} must live in CPU memory, got a tensor on {x.device}")
        try:
            return x.detach().numpy()
        except RuntimeError as exc:  # conjugate/negative views, layouts numpy cannot share
            raise TypeError(f"out.{name} must be a plain strided CPU tensor that numpy can view: {exc}") from None
    raise TypeError(f"out.{name} must be a numpy array or CPU torch tensor, got {type(x).__name__}")


class ReplayBuffer(_core.ReplayBufferCore):
    """Circular experience replay that stores each environment frame once.

    Args:
        capacity: transitions kept (the oldest are overwritten).
        obs_shape: one observation as the env returns it, e.g. ``(4, 84, 84)``
            with ``frame_stack=4`` (Atari) or ``(4,)`` with ``frame_stack=1``.
        obs_dtype: observation dtype (uint8 for frames, float32 for vectors).
        frame_stack: k, the number of frames stacked in one observation.
        num_envs: environments adding in lockstep; each is its own stream.
        action_shape, action_dtype: one action.
        seed: PRNG seed for sampling (random when None).
        stack_axis: 0 for frame-first stacks ``(k, H, W)``, -1 for channel-last
            stacks ``(H, W, k)``.
        frame_reserve: extra frame slots for episode starts, as a fraction of
            capacity.
        sample_threads: threads for large gathers, at most 256. 0 (default):
            one per core, up to 4, used only while they measure faster than
            the caller alone (they do not when other work keeps the cores
            busy); N: always N; 1: the caller alone.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape,
        obs_dtype=np.uint8,
        frame_stack: int = 1,
        num_envs: int = 1,
        action_shape=(),
        action_dtype=np.int64,
        seed: Optional[int] = None,
        *,
        stack_axis: int = 0,
        frame_reserve: float = DEFAULT_FRAME_RESERVE,
        sample_threads: int = 0,
    ):
        capacity = _positive_int(capacity, "capacity")
        frame_stack = _positive_int(frame_stack, "frame_stack", _core.MAX_FRAME_STACK)
        num_envs = _positive_int(num_envs, "num_envs", _core.MAX_NUM_ENVS)
        obs_shape = _shape(obs_shape, "obs_shape")
        action_shape = _shape(action_shape, "action_shape")
        if _int(stack_axis, "stack_axis") not in (0, -1):
            raise ValueError(f"stack_axis must be 0 (frames first) or -1 (channel-last), got {stack_axis!r}")
        stack_last = stack_axis == -1 and frame_stack > 1
        frame_shape = obs_shape
        if frame_stack > 1:
            axis = -1 if stack_last else 0
            if not obs_shape or obs_shape[axis] != frame_stack:
                raise ValueError(
                    f"obs_shape {obs_shape} must have frame_stack={frame_stack} frames on axis {stack_axis}"
                )
            frame_shape = obs_shape[:-1] if stack_last else obs_shape[1:]
            if not frame_shape:
                raise ValueError(f"obs_shape {obs_shape} has no room for a frame besides the stack axis")
        if seed is None:
            seed = secrets.randbits(64)
        elif not 0 <= _int(seed, "seed", "None or an int") < 2**64:
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
        if isinstance(frame_reserve, bool) or not isinstance(frame_reserve, numbers.Real):
            raise TypeError(f"frame_reserve must be a float, got {type(frame_reserve).__name__}")
        if not 0 <= frame_reserve <= 64:  # also NaN; compared before float() (a huge int overflows it)
            raise ValueError(f"frame_reserve must be a fraction between 0 and 64, got {frame_reserve!r}")
        if not 0 <= _int(sample_threads, "sample_threads") <= _core.MAX_SAMPLE_THREADS:
            raise ValueError(f"sample_threads must be between 0 and {_core.MAX_SAMPLE_THREADS}, got {sample_threads}")
        super().__init__(
            capacity,
            num_envs,
            frame_stack,
            list(frame_shape),
            _dtype(obs_dtype, "obs_dtype"),
            list(action_shape),
            _dtype(action_dtype, "action_dtype"),
            int(seed),
            stack_last,
            float(frame_reserve),
            int(sample_threads),
        )
        self.seed = int(seed)
        self.frame_reserve = float(frame_reserve)
        self.sample_threads = int(sample_threads)
        self._views = {}  # id(out) -> (out, core arguments, tensor layouts, tensors): see sample_into
        self._views_lock = threading.Lock()  # the prefetch thread and the caller both fill the cache

    def __repr__(self) -> str:
        if "seed" not in self.__dict__:
            # The native part was never built (a failed __init__, whose frame a
            # traceback with locals still shows): touching it would crash.
            return f"<{type(self).__name__}: not constructed>"
        return (
            f"ReplayBuffer(capacity={self.capacity}, obs_shape={self.obs_shape}, obs_dtype={self.obs_dtype}, "
            f"frame_stack={self.frame_stack}, num_envs={self.num_envs}, len={len(self)}, nbytes={self.nbytes})"
        )

    # ------------------------------------------------------------------ sampling
    def empty_batch(self, batch_size: int, window: bool = False, *, torch: bool = False, pin_memory: bool = False):
        """Preallocated output for ``sample_into``.

        ``torch=True`` makes CPU torch tensors; ``pin_memory=True`` makes them
        page-locked (needs CUDA) so a copy to the GPU can run asynchronously.
        """
        batch_size = _positive_int(batch_size, "batch_size")
        k = self.frame_stack
        shapes = {
            "action": (batch_size, *self.action_shape),
            "reward": (batch_size,),
            "terminated": (batch_size,),
            "truncated": (batch_size,),
            "ids": (batch_size,),
        }
        dtypes = {
            "action": self.action_dtype,
            "reward": np.dtype(np.float32),
            "terminated": np.dtype(np.bool_),
            "truncated": np.dtype(np.bool_),
            "ids": np.dtype(np.int64),
        }
        if window:
            frame_shape = self.frame_shape
            shapes["frames"] = (
                (batch_size, *frame_shape, k + 1) if self.stack_last else (batch_size, k + 1, *frame_shape)
            )
        else:
            shapes["obs"] = shapes["next_obs"] = (batch_size, *self.obs_shape)
            dtypes["obs"] = dtypes["next_obs"] = self.obs_dtype
        dtypes["frames"] = self.obs_dtype

        if torch or pin_memory:
            import torch as th

            if pin_memory and not th.cuda.is_available():
                raise ValueError("pin_memory=True needs CUDA, which torch does not see; use pin_memory=False")

            def alloc(name):
                try:
                    return th.empty(shapes[name], dtype=_torch_dtype(dtypes[name]), pin_memory=pin_memory)
                except RuntimeError as exc:  # torch reports a failed or impossible allocation so
                    nbytes = math.prod(shapes[name]) * dtypes[name].itemsize
                    raise MemoryError(
                        f"cannot allocate {nbytes} bytes for out.{name} of a batch of {batch_size}: {exc}"
                    ) from None
        else:

            def alloc(name):
                return np.empty(shapes[name], dtype=dtypes[name])

        fields = {name: alloc(name) for name in shapes}
        if window:
            frames = fields["frames"]
            if k == 1:
                fields["obs"], fields["next_obs"] = frames[:, 0], frames[:, 1]
            elif self.stack_last:
                fields["obs"], fields["next_obs"] = frames[..., :k], frames[..., 1:]
            else:
                fields["obs"], fields["next_obs"] = frames[:, :k], frames[:, 1:]
        return Batch(**fields)

    def sample_into(self, out: Batch) -> Batch:
        """Fill ``out`` (from ``empty_batch``) with a uniform batch, in place.

        The batch size is ``len(out.ids)``. Allocates nothing; the gather runs
        in native code without the GIL. In window mode only ``out.frames`` is
        written (``obs``/``next_obs`` are views of it).
        """
        cached = self._views.get(id(out))
        if cached is not None and cached[0] is out and cached[2] == _layouts(cached[3]):
            self._sample_into(*cached[1])  # the same tensors, same memory and layout: skip ~35 us of Python
            return out
        if not isinstance(out, Batch):
            raise TypeError(f"out must be a Batch (from empty_batch), got {type(out).__name__}")
        window = out.frames is not None
        names = ("frames",) if window else ("obs", "next_obs")
        fields = {n: getattr(out, n) for n in names + ("action", "reward", "terminated", "truncated", "ids")}
        views = {n: _writable_array(x, n) for n, x in fields.items()}
        args = [views.get(n) for n in ("obs", "next_obs", "frames", "action", "reward", "terminated", "truncated", "ids")]
        self._sample_into(*args)
        tensors = [x for x in fields.values() if not isinstance(x, np.ndarray)]
        if tensors:  # torch outputs: reuse their numpy views while memory and layout stay the same
            entry = (out, args, _layouts(tensors), tensors)
            with self._views_lock:  # dict.get above is atomic; evicting while another thread inserts is not
                while len(self._views) >= _VIEW_CACHE:  # a few batches (the prefetcher's slots); oldest out first
                    self._views.pop(next(iter(self._views)))
                self._views[id(out)] = entry
        return out

    def sample(self, batch_size: int, window: bool = False) -> Batch:
        """A new batch of ``batch_size`` transitions drawn uniformly with replacement."""
        if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer: add transitions first")
        return self.sample_into(self.empty_batch(batch_size, window))

    # --------------------------------------------------------------- persistence
    def save(self, path) -> None:
        """Write the whole buffer to ``path`` atomically (see dqn_fast/replay_file.py)."""
        replay_file.save(self, path)

    @classmethod
    def load(cls, path) -> "ReplayBuffer":
        """A buffer read from a file written by ``save``; ``ReplayFileError`` if it is not sound."""
        return replay_file.load(cls, path)

    def __reduce__(self):
        # Pickling (e.g. Stable-Baselines3's save_replay_buffer) goes through
        # the same checked format, held in memory.
        return (replay_file.from_bytes, (replay_file.to_bytes(self),))


def _torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
