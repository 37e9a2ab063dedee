"""The replay buffers people use today, behind one small interface.

Each adapter is configured the way its project's documentation or its own
DQN-on-Atari example recommends for frame stacks, and does what a trainer
must do with it: `add` a step of `num_envs` transitions, and `sample` a
batch as torch tensors `(obs, action, reward, next_obs, terminated)` on the
CPU. The conversion to tensors is part of sampling: a learner needs it.

`prepare` turns an env step into what the peer's own users hold when they
call add (untimed): arrays and Python scalars from a single gymnasium env,
batched arrays plus infos from an SB3 VecEnv, a TensorDict from a TorchRL
collector, a Batch from a Tianshou collector. `add` is then only the
buffer's own call.

Where a peer does not return every transition exactly (episode starts and
ends), `exactness` says how; tests/test_bench_peers.py checks each adapter
against the reference on small streams, including these documented gaps.
A peer whose package is not installed is reported missing, never dropped.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import tempfile
from collections import deque
from typing import Dict, List, Optional, Tuple, Type

import numpy as np

EXACT = "exact"
# cpprb's fields besides the observation, as our transitions have them
_CPPRB_FIELDS = {"act": {"dtype": np.int64}, "rew": {"dtype": np.float32}, "done": {"dtype": np.bool_}}


def unbatched(step):
    """A one-env step as a plain gymnasium loop has it: arrays and Python scalars."""
    obs, action, reward, next_obs, terminated, truncated = step
    return obs[0], int(action[0]), float(reward[0]), next_obs[0], bool(terminated[0]), bool(truncated[0])


class Peer:
    name = ""
    package = ""  # pip name; "" for none needed
    modules: Tuple[str, ...] = ()  # importable names that must exist
    exactness = EXACT
    max_envs: Optional[int] = None  # None: any number of envs per add

    def __init__(self, capacity: int, obs_shape: tuple, frame_stack: int, num_envs: int, seed: int = 0):
        self.capacity, self.obs_shape, self.k, self.num_envs = capacity, tuple(obs_shape), frame_stack, num_envs
        self.uint8 = frame_stack > 1  # frame stacks are uint8 pixels, vectors float32
        self.obs_dtype = np.uint8 if self.uint8 else np.float32

    @classmethod
    def missing(cls) -> Optional[str]:
        """None when usable, else what to install."""
        for m in cls.modules:
            if importlib.util.find_spec(m) is None:
                return f"not installed (pip install {cls.package})"
        return None

    @classmethod
    def supports(cls, num_envs: int) -> Optional[str]:
        if cls.max_envs is not None and num_envs > cls.max_envs:
            return f"not applicable: one sequential stream per buffer (num_envs={num_envs})"
        return None

    def prepare(self, step) -> tuple:
        """The arguments of `add` for one env step (obs, action, reward, next_obs, terminated, truncated)."""
        return unbatched(step) if self.num_envs == 1 else step

    def add(self, *prepared) -> None:
        raise NotImplementedError

    def sample(self, batch: int):
        raise NotImplementedError

    def nbytes(self) -> Optional[int]:
        """Bytes of the storage arrays, where the peer exposes them."""
        return None

    def close(self) -> None:
        pass


def _torch():
    import torch

    return torch


def _cpprb_tensors(s: dict, obs, next_obs) -> tuple:
    torch = _torch()
    return (obs, torch.from_numpy(s["act"]).flatten(), torch.from_numpy(s["rew"]).flatten(), next_obs,
            torch.from_numpy(s["done"]).flatten())


# --------------------------------------------------------------------------- this project
class DqnFast(Peer):
    name = "dqn_fast"
    modules = ("torch",)

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0, window=False, sample_threads=0):
        super().__init__(capacity, obs_shape, frame_stack, num_envs, seed)
        from ..replay import ReplayBuffer

        self.buf = ReplayBuffer(capacity, obs_shape, self.obs_dtype, frame_stack=frame_stack, num_envs=num_envs, seed=seed,
                                sample_threads=sample_threads)
        self.window = window and frame_stack > 1
        self.out: Dict[int, object] = {}

    def add(self, obs, action, reward, next_obs, terminated, truncated):
        self.buf.add(obs, action, reward, next_obs, terminated, truncated)

    def sample(self, batch):
        out = self.out.get(batch)
        if out is None:  # preallocated torch tensors, filled in place by native code
            out = self.out[batch] = self.buf.empty_batch(batch, window=self.window, torch=True)
        self.buf.sample_into(out)
        if self.window:  # the k+1 frame window: obs and next_obs are views of it
            return out.frames[:, : self.k], out.action, out.reward, out.frames[:, 1:], out.terminated
        return out.obs, out.action, out.reward, out.next_obs, out.terminated

    def nbytes(self):
        return self.buf.nbytes


class DqnFastWindow(DqnFast):
    name = "dqn_fast (window)"

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        super().__init__(capacity, obs_shape, frame_stack, num_envs, seed, window=True)


# --------------------------------------------------------------------------- textbook
class DequeReplay(Peer):
    """The textbook replay (PyTorch's DQN tutorial, many blog posts): a deque
    of tuples and random.sample, stacked into tensors per batch. It keeps
    references to the env's arrays: obs of step t+1 is next_obs of step t."""

    name = "deque + random.sample"

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        super().__init__(capacity, obs_shape, frame_stack, num_envs, seed)
        self.memory: deque = deque(maxlen=capacity)
        self.rng = random.Random(seed)

    def add(self, obs, action, reward, next_obs, terminated, truncated):
        if self.num_envs == 1:
            self.memory.append((obs, action, reward, next_obs, terminated))
            return
        for e in range(self.num_envs):
            self.memory.append((obs[e], int(action[e]), float(reward[e]), next_obs[e], bool(terminated[e])))

    def sample(self, batch):
        torch = _torch()
        rows = self.rng.sample(self.memory, batch)
        obs, action, reward, nxt, term = zip(*rows)
        return (torch.from_numpy(np.stack(obs)), torch.tensor(action), torch.tensor(reward, dtype=torch.float32),
                torch.from_numpy(np.stack(nxt)), torch.tensor(term))


# --------------------------------------------------------------------------- Stable-Baselines3
class SB3(Peer):
    """stable_baselines3.common.buffers.ReplayBuffer, as SB3's DQN builds it:
    timeouts handled (a truncation still bootstraps)."""

    name = "SB3"
    package = "stable-baselines3"
    modules = ("stable_baselines3",)
    optimize = False

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        super().__init__(capacity, obs_shape, frame_stack, num_envs, seed)
        from gymnasium import spaces
        from stable_baselines3.common.buffers import ReplayBuffer

        space = (spaces.Box(0, 255, self.obs_shape, np.uint8) if self.uint8
                 else spaces.Box(-np.inf, np.inf, self.obs_shape, np.float32))
        np.random.seed(seed)  # SB3 samples with numpy's global generator
        self.rb = ReplayBuffer(capacity, space, spaces.Discrete(6), "cpu", n_envs=num_envs,
                               optimize_memory_usage=self.optimize, handle_timeout_termination=not self.optimize)

    def prepare(self, step):
        # what SB3's off-policy loop holds: VecEnv arrays (n_envs first, also for one env) and infos
        obs, action, reward, next_obs, terminated, truncated = step
        infos = [{"TimeLimit.truncated": bool(t)} for t in truncated]
        return obs, next_obs, action.reshape(-1, 1), reward, terminated | truncated, infos

    def add(self, *prepared):
        self.rb.add(*prepared)

    def sample(self, batch):
        s = self.rb.sample(batch)
        return s.observations, s.actions.flatten(), s.rewards.flatten(), s.next_observations, s.dones.flatten()

    def nbytes(self):
        arrays = [self.rb.observations, self.rb.actions, self.rb.rewards, self.rb.dones, self.rb.timeouts]
        if not self.optimize:
            arrays.append(self.rb.next_observations)
        return sum(a.nbytes for a in arrays)


class SB3Optimized(SB3):
    """optimize_memory_usage=True: next_obs is the following row's obs. SB3
    forbids it with timeout handling, so a truncation is stored as terminal,
    and an episode's final obs is overwritten by the next episode's first."""

    name = "SB3 optimize_memory_usage"
    optimize = True
    exactness = "episode ends: next_obs is the next episode's first obs; truncation stored as terminal"


# --------------------------------------------------------------------------- cpprb
class Cpprb(Peer):
    name = "cpprb"
    package = "cpprb"
    modules = ("cpprb",)

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        super().__init__(capacity, obs_shape, frame_stack, num_envs, seed)
        import cpprb

        np.random.seed(seed)  # cpprb samples with numpy's global generator
        obs = {"shape": self.obs_shape, "dtype": self.obs_dtype}
        self.rb = cpprb.ReplayBuffer(capacity, {"obs": obs, "next_obs": obs, **_CPPRB_FIELDS})

    def add(self, obs, action, reward, next_obs, terminated, truncated):
        self.rb.add(obs=obs, act=action, rew=reward, next_obs=next_obs, done=terminated)

    def sample(self, batch):
        torch = _torch()
        s = self.rb.sample(batch)
        return _cpprb_tensors(s, torch.from_numpy(s["obs"]), torch.from_numpy(s["next_obs"]))

    def nbytes(self):
        per = 2 * int(np.prod(self.obs_shape)) * (1 if self.uint8 else 4) + 8 + 4 + 1
        return per * self.capacity


class CpprbCompressed(Peer):
    """cpprb's memory compression, per its documentation: `next_of="obs"`
    (next_obs shares obs's memory) and, for frame stacks, `stack_compress`
    (the stack axis last), with `on_episode_end()` after each episode. Both
    assume one sequential stream, so it takes a single env."""

    name = "cpprb next_of+stack_compress"
    package = "cpprb"
    modules = ("cpprb",)
    max_envs = 1

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        super().__init__(capacity, obs_shape, frame_stack, num_envs, seed)
        import cpprb

        np.random.seed(seed)
        # frame stacks: channel-last, for stack_compress
        shape = (*self.obs_shape[1:], self.obs_shape[0]) if self.uint8 else self.obs_shape
        compress = {"stack_compress": "obs"} if self.uint8 else {}
        self.rb = cpprb.ReplayBuffer(capacity, {"obs": {"shape": shape, "dtype": self.obs_dtype}, **_CPPRB_FIELDS},
                                     next_of="obs", **compress)

    def _layout(self, x):
        return np.moveaxis(x, 0, -1) if self.uint8 else x

    def add(self, obs, action, reward, next_obs, terminated, truncated):
        self.rb.add(obs=self._layout(obs), act=action, rew=reward, next_obs=self._layout(next_obs), done=terminated)
        if terminated or truncated:
            self.rb.on_episode_end()

    def sample(self, batch):
        torch = _torch()
        s = self.rb.sample(batch)
        obs, nxt = torch.from_numpy(s["obs"]), torch.from_numpy(s["next_obs"])
        if self.uint8:  # back to (N, k, H, W) for the network: a view
            obs, nxt = obs.permute(0, 3, 1, 2), nxt.permute(0, 3, 1, 2)
        return _cpprb_tensors(s, obs, nxt)


# --------------------------------------------------------------------------- TorchRL
class TorchRL(Peer):
    """torchrl.data.ReplayBuffer over a LazyTensorStorage of TensorDicts with
    the "next" sub-dict, as TorchRL's DQN Atari example stores them."""

    name = "TorchRL LazyTensorStorage"
    package = "torchrl"
    modules = ("torchrl", "tensordict")

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        super().__init__(capacity, obs_shape, frame_stack, num_envs, seed)
        import torch
        from torchrl.data import ReplayBuffer

        logging.getLogger("torchrl").setLevel(logging.WARNING)  # it logs every storage it initialises
        torch.manual_seed(seed)  # TorchRL samples with torch's global generator
        self.rb = ReplayBuffer(storage=self._storage(capacity))

    def _storage(self, capacity):
        from torchrl.data import LazyTensorStorage

        return LazyTensorStorage(capacity)

    def prepare(self, step):
        # what a TorchRL collector hands over: a TensorDict (one transition for one env)
        import torch
        from tensordict import TensorDict

        obs, action, reward, next_obs, terminated, truncated = (torch.from_numpy(x) for x in step)
        td = TensorDict({"obs": obs, "action": action, "reward": reward,
                         "next": {"obs": next_obs, "terminated": terminated, "truncated": truncated}},
                        batch_size=[self.num_envs])
        return (td[0] if self.num_envs == 1 else td,)

    def add(self, td):
        if self.num_envs == 1:
            self.rb.add(td)
        else:
            self.rb.extend(td)

    def sample(self, batch):
        s = self.rb.sample(batch)
        return s["obs"], s["action"], s["reward"], s["next", "obs"], s["next", "terminated"]

    def nbytes(self):
        storage = self.rb.storage
        if not getattr(storage, "initialized", True) or storage._storage is None:
            return 0
        return int(sum(x.numel() * x.element_size() for x in storage._storage.values(True, True)))


class TorchRLMemmap(TorchRL):
    """LazyMemmapStorage: the same TensorDicts in memory-mapped files (TorchRL's
    recommendation for buffers larger than RAM); their pages count in RSS
    while cached."""

    name = "TorchRL LazyMemmapStorage"

    def _storage(self, capacity):
        from torchrl.data import LazyMemmapStorage

        self.dir = tempfile.TemporaryDirectory(prefix="dqn_fast-bench-")
        return LazyMemmapStorage(capacity, scratch_dir=self.dir.name)

    def close(self):
        del self.rb
        self.dir.cleanup()


# --------------------------------------------------------------------------- Tianshou
class Tianshou(Peer):
    """tianshou.data.(Vector)ReplayBuffer as Tianshou's Atari examples build it:
    stack_num=4, ignore_obs_next=True, save_only_last_obs=True (one frame per
    transition; stacks and obs_next rebuilt by index arithmetic)."""

    name = "Tianshou"
    package = "tianshou"
    modules = ("tianshou",)
    exactness = ("obs_next is obs at episode ends and for the newest transition; in a wrapped ring the "
                 "oldest stack_num-1 transitions are stacked with the oldest stored frame as padding")

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        super().__init__(capacity, obs_shape, frame_stack, num_envs, seed)
        from tianshou.data import ReplayBuffer, VectorReplayBuffer

        stacked = self.k > 1
        kwargs = dict(stack_num=self.k, ignore_obs_next=True, save_only_last_obs=True) if stacked else {}
        kwargs["random_seed"] = seed
        if not stacked:
            self.exactness = EXACT
        if num_envs == 1:
            self.rb = ReplayBuffer(capacity, **kwargs)
        else:
            self.rb = VectorReplayBuffer(capacity, num_envs, **kwargs)
        self.ids = np.arange(num_envs)

    def prepare(self, step):
        # what Tianshou's collector hands over: a Batch (and buffer ids with several envs)
        from tianshou.data import Batch

        obs, action, reward, next_obs, terminated, truncated = super().prepare(step)
        info = {} if self.num_envs == 1 else [{}] * self.num_envs
        return (Batch(obs=obs, act=action, rew=reward, terminated=terminated, truncated=truncated,
                      obs_next=next_obs, info=info),)

    def add(self, batch):
        if self.num_envs == 1:
            self.rb.add(batch)
        else:
            self.rb.add(batch, buffer_ids=self.ids)

    def sample(self, batch):
        torch = _torch()
        b, _ = self.rb.sample(batch)
        return (torch.from_numpy(b.obs), torch.from_numpy(b.act), torch.from_numpy(b.rew),
                torch.from_numpy(b.obs_next), torch.from_numpy(b.terminated))


# The side-by-side report's rows (this project's window output is measured in its own row's window).
COMPARED: List[Type[Peer]] = [DqnFast, DequeReplay, SB3, SB3Optimized, Cpprb, CpprbCompressed, TorchRL, TorchRLMemmap,
                              Tianshou]
PEERS: List[Type[Peer]] = COMPARED + [DqnFastWindow]  # every adapter (tests, pytest-benchmark)
BY_NAME: Dict[str, Type[Peer]] = {p.name: p for p in PEERS}
