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
* Sampling is uniform with replacement, from a seeded per-buffer PRNG in C++,
  or (``prioritized=True``) proportional to (p + eps)^alpha, stratified.
* ``n_step > 1``: a sampled transition's reward is the discounted sum over
  its n-step window (see the README's "n-step returns"), computed natively
  at sample time from the one-step transitions: n changes nothing stored.
* ``compression="lz4" | "zstd"``: frames are coded on add (keys through
  C-Blosc2, the others as byte patches against their env's previous frame)
  into a byte arena of ``frame_memory`` bytes, and decoded natively at sample
  time, bit-exactly; when the arena is full the oldest transitions go first
  and ``len`` says so (README: "Compressed frame store").
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

__all__ = ["Batch", "ReplayBuffer", "ReplayFileError", "window_next_obs"]

# Default share of extra frame slots for episode starts. An episode start
# stores one extra frame with reset padding, two with zero padding; 4.4%
# covers episodes of 50+ steps and keeps nbytes under 7,056 x 1.05 + 16 bytes
# per Atari transition.
DEFAULT_FRAME_RESERVE = 0.044


class Batch(NamedTuple):
    """One sampled batch. Fields are numpy arrays or CPU torch tensors.

    ``reward`` is the n-step return, ``discount`` gamma^m (m: the window's
    length), ``weights`` the importance weights (1 unless prioritized).

    Window mode: ``frames`` holds k+n frames per transition: obs's k frames,
    then the newest frame of each of the m transitions of its window, then
    zeros. ``obs`` is frames[:, :k]; next_obs is frames[:, m:m+k], with
    ``next_start`` = m. With n_step=1, m is always 1 and ``next_obs`` is the
    view frames[:, 1:]; with n_step > 1 rows differ, so ``next_obs`` is None
    and ``window_next_obs(frames, next_start, k)`` gathers it (on any device).
    """

    obs: Any
    action: Any
    reward: Any
    next_obs: Any
    terminated: Any
    truncated: Any
    ids: Any
    frames: Any = None
    weights: Any = None
    discount: Any = None
    next_start: Any = None


def window_next_obs(frames, next_start, frame_stack: int, stack_last: bool = False):
    """next_obs of a window batch: frames[b, s_b : s_b + k] with s_b = next_start[b]
    (on the last axis when stack_last). numpy arrays or torch tensors on any
    device: one gather there, no host sync. Returns batch.obs's shape (k == 1:
    the stack axis dropped)."""
    k = _positive_int(frame_stack, "frame_stack")
    dim = frames.ndim - 1 if stack_last and k > 1 else 1  # one frame: the buffer never stacks last
    shape = [1] * frames.ndim
    shape[0], shape[dim] = frames.shape[0], k
    size = list(frames.shape)
    size[dim] = k
    if isinstance(frames, np.ndarray):
        index = np.asarray(next_start, dtype=np.int64).reshape(-1, 1) + np.arange(k)
        out = np.take_along_axis(frames, np.broadcast_to(index.reshape(shape), size), axis=dim)
    else:
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
        index = torch.as_tensor(next_start, device=frames.device).long().view(-1, 1)
        index = index + torch.arange(k, device=frames.device)
        out = frames.gather(dim, index.view(shape).expand(size))
    return out[:, 0] if k == 1 else out


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


def _real(value, name: str, low: float, high: float) -> float:
    """A finite float in [low, high] (high may be inf: then any finite value above low)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (low <= value <= high and math.isfinite(value)):  # NaN fails every comparison
        upper = "" if math.isinf(high) else f" and <= {high}"
        raise ValueError(f"{name} must be finite, >= {low}{upper}, got {value!r}")
    return float(value)


def _beta(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"beta must be a float, got {type(value).__name__}")
    return _real(value, "beta", 0.0, math.inf)


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
        n_step: transitions summed into one sampled return (1 to 64).
        gamma: the return's discount, in [0, 1].
        prioritized: proportional prioritized replay (Schaul et al. 2016).
        alpha, priority_eps: P(i) ~ (p_i + priority_eps)^alpha.
        compression: None (frames stored raw), "lz4" or "zstd": frames coded
            losslessly on add (key frames with that codec through C-Blosc2,
            the others as byte patches against their env's previous frame)
            into a byte arena of ``frame_memory`` bytes; sampling decodes
            them natively. See the README's "Compressed frame store".
        frame_memory: bytes the compressed frames may take (the arena; pages
            are touched only as frames fill them). None: an eighth of the raw
            frames' size, ``frame_capacity * (max(frame_bytes // 8,
            min(frame_bytes, 64)) + 1)`` (Atari frames code to 1-5%). When
            the arena is full the oldest transitions go first, and ``len``
            says so.
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
        n_step: int = 1,
        gamma: float = 0.99,
        prioritized: bool = False,
        alpha: float = 0.6,
        priority_eps: float = 1e-6,
        compression: Optional[str] = None,
        frame_memory: Optional[int] = None,
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
        n_step = _positive_int(n_step, "n_step", _core.MAX_N_STEP)
        gamma = _real(gamma, "gamma", 0.0, 1.0)
        if not isinstance(prioritized, (bool, np.bool_)):
            raise TypeError(f"prioritized must be a bool, got {type(prioritized).__name__}")
        alpha = _real(alpha, "alpha", 0.0, math.inf)
        priority_eps = _real(priority_eps, "priority_eps", 0.0, math.inf)
        if compression is not None and not isinstance(compression, str):
            raise TypeError(f"compression must be None, 'lz4' or 'zstd', got {type(compression).__name__}")
        if compression not in (None, "lz4", "zstd"):
            raise ValueError(f"compression must be None, 'lz4' or 'zstd', got {compression!r}")
        if frame_memory is not None:
            if compression is None:
                raise ValueError("frame_memory is the compressed arena's budget: pass compression='lz4' or 'zstd' too")
            frame_memory = _positive_int(frame_memory, "frame_memory", 2**63 - 1)
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
            n_step,
            gamma,
            bool(prioritized),
            alpha,
            priority_eps,
            compression or "none",
            frame_memory or 0,
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
            f"frame_stack={self.frame_stack}, num_envs={self.num_envs}, n_step={self.n_step}, "
            f"prioritized={self.prioritized}, compression={self.compression!r}, len={len(self)}, nbytes={self.nbytes})"
        )

    # ------------------------------------------------------------------ sampling
    def empty_batch(self, batch_size: int, window: bool = False, *, torch: bool = False, pin_memory: bool = False):
        """Preallocated output for ``sample_into`` and ``get_into``.

        ``torch=True`` makes CPU torch tensors; ``pin_memory=True`` makes them
        page-locked (needs CUDA) so a copy to the GPU can run asynchronously.
        ``window=True``: one row of k+n frames per transition (see ``Batch``).
        """
        batch_size = _positive_int(batch_size, "batch_size")
        k, n = self.frame_stack, self.n_step
        shapes = {
            "action": (batch_size, *self.action_shape),
            "reward": (batch_size,),
            "terminated": (batch_size,),
            "truncated": (batch_size,),
            "ids": (batch_size,),
            "weights": (batch_size,),
            "discount": (batch_size,),
        }
        dtypes = {
            "action": self.action_dtype,
            "reward": np.dtype(np.float32),
            "terminated": np.dtype(np.bool_),
            "truncated": np.dtype(np.bool_),
            "ids": np.dtype(np.int64),
            "weights": np.dtype(np.float32),
            "discount": np.dtype(np.float32),
            "next_start": np.dtype(np.int64),
        }
        if window:
            frame_shape = self.frame_shape
            shapes["frames"] = (
                (batch_size, *frame_shape, k + n) if self.stack_last else (batch_size, k + n, *frame_shape)
            )
            shapes["next_start"] = (batch_size,)
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
                fields["obs"] = frames[:, 0]
                fields["next_obs"] = frames[:, 1] if n == 1 else None
            elif self.stack_last:
                fields["obs"] = frames[..., :k]
                fields["next_obs"] = frames[..., 1 : k + 1] if n == 1 else None
            else:
                fields["obs"] = frames[:, :k]
                fields["next_obs"] = frames[:, 1 : k + 1] if n == 1 else None
        return Batch(**fields)

    _FIELDS = ("obs", "next_obs", "frames", "action", "reward", "terminated", "truncated", "ids",
               "weights", "discount", "next_start")

    def _fill(self, out: Batch, beta, ids) -> Batch:
        cached = self._views.get(id(out))
        if cached is not None and cached[0] is out and cached[2] == _layouts(cached[3]):
            # The same tensors, same memory and layout: skip ~35 us of Python.
            self._fill_into(*cached[1], beta, ids)
            return out
        if not isinstance(out, Batch):
            raise TypeError(f"out must be a Batch (from empty_batch), got {type(out).__name__}")
        window = out.frames is not None
        skip = ("obs", "next_obs") if window else ("frames", "next_start")
        fields = {n: getattr(out, n) for n in self._FIELDS if n not in skip and getattr(out, n) is not None}
        views = {n: _writable_array(x, n) for n, x in fields.items()}
        args = [views.get(n) for n in self._FIELDS]
        self._fill_into(*args, beta, ids)
        tensors = [x for x in fields.values() if not isinstance(x, np.ndarray)]
        if tensors:  # torch outputs: reuse their numpy views while memory and layout stay the same
            entry = (out, args, _layouts(tensors), tensors)
            with self._views_lock:  # dict.get above is atomic; evicting while another thread inserts is not
                while len(self._views) >= _VIEW_CACHE:  # a few batches (the prefetcher's slots); oldest out first
                    self._views.pop(next(iter(self._views)))
                self._views[id(out)] = entry
        return out

    def sample_into(self, out: Batch, beta: float = 0.4) -> Batch:
        """Fill ``out`` (from ``empty_batch``) with a drawn batch, in place.

        The batch size is ``len(out.ids)``. Allocates nothing; the draws and
        the gather run in native code without the GIL. In window mode only
        ``out.frames`` is written (``obs``/``next_obs`` are views of it).
        ``beta`` sets the importance weights of a prioritized buffer.
        """
        return self._fill(out, beta if type(beta) is float and 0 <= beta < math.inf else _beta(beta), None)

    def sample(self, batch_size: int, window: bool = False, beta: float = 0.4) -> Batch:
        """A new batch of ``batch_size`` transitions drawn with replacement
        (uniformly, or by priority when prioritized)."""
        if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        beta = _beta(beta)
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer: add transitions first")
        return self.sample_into(self.empty_batch(batch_size, window), beta)

    def get(self, ids, window: bool = False, beta: float = 0.4) -> Batch:
        """The stored transitions with these ids, as ``sample`` would return them.

        ``ValueError`` naming the first id that is not stored.
        """
        ids = _ids(ids)
        if len(ids) == 0:
            raise ValueError("ids is empty: get needs at least one transition id")
        return self.get_into(ids, self.empty_batch(len(ids), window), beta)

    def get_into(self, ids, out: Batch, beta: float = 0.4) -> Batch:
        """``get`` into a preallocated batch of ``len(ids)``."""
        ids = _ids(ids)
        if not isinstance(out, Batch):
            raise TypeError(f"out must be a Batch (from empty_batch), got {type(out).__name__}")
        return self._fill(out, _beta(beta), ids)

    def update_priorities(self, ids, priorities) -> None:
        """Set the priorities of sampled transitions (numpy or CPU torch arrays).

        Priorities must be finite and >= 0 (else ``ValueError`` and nothing
        changes); the buffer adds ``priority_eps`` and raises to ``alpha``
        itself. Ids evicted since their sample are ignored; a repeated id
        keeps its last priority.
        """
        # numpy inputs go straight to the bindings, which check them (~2 us a call in all).
        self._update_priorities(
            ids if type(ids) is np.ndarray else _ids(ids),
            priorities if type(priorities) is np.ndarray else _numpy(priorities, "priorities"),
        )

    def probabilities(self, ids):
        """P(i) of each stored id, float64 (1/len(buf) when not prioritized)."""
        return self._probabilities(_ids(ids))

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


def _numpy(x, name: str):
    """numpy view of an input array (CPU torch tensors included; GPU ones are refused)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if not x.is_cpu:
            raise TypeError(f"{name} must live in CPU memory, got a tensor on {x.device} (call .cpu() first)")
        return x.numpy() if not x.requires_grad else x.detach().numpy()
    return x


def _ids(ids):
    ids = _numpy(ids, "ids")
    if ids is None or isinstance(ids, (str, bytes, float, bool)):
        raise TypeError(f"ids must be an integer array, got {type(ids).__name__}")
    a = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
    if a.size == 0 and not isinstance(ids, np.ndarray):
        a = a.astype(np.int64)  # [] is float64 to numpy, but holds no ids of the wrong type
    if a.dtype.kind not in "iu":
        raise TypeError(f"ids must be an integer array, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {a.shape}")
    return a


def _torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
