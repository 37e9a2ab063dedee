"""Prioritized and n-step replay peers, behind the interface of bench/peers.py.

Prioritized adapters (`kind = "per"`) sample a batch as torch tensors
`(obs, action, reward, next_obs, terminated, weights)` and remember the
batch's ids; `update(priorities)` then hands new priorities for exactly that
batch back, as a learner does after its loss. n-step adapters
(`kind = "nstep"`) sample `(obs, action, reward, next_obs, terminated,
discount)`, the reward being the n-step return (discount None where the peer
does not return one). Each is set up as its project's documentation does it.

A peer that cannot run here says why in `unavailable()` (the exception text
or the measured defect), called in the benchmark's child process, and is
reported with that reason, never dropped. tests/test_bench_peers.py checks
every adapter against the reference; `exactness` says where a peer differs.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Type

import numpy as np

from . import peers as P

GAMMA = 0.99
N_STEP = 3
ALPHA, BETA, EPS = 0.6, 0.4, 1e-6  # the defaults, given to every peer alike


def _core_lacks_features() -> Optional[str]:
    from ..replay import ReplayBuffer

    try:
        ReplayBuffer(10, (2,), np.float32, n_step=2, prioritized=True)
    except TypeError as exc:  # the native core predates #10
        return f"unavailable: this dqn_fast build has no n_step/prioritized ({exc}); rebuild the core"
    return None


# --------------------------------------------------------------------------- this project
class DqnFastPrioritized(P.DqnFast):
    name = "dqn_fast prioritized"
    kind = "per"

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        P.Peer.__init__(self, capacity, obs_shape, frame_stack, num_envs, seed)
        from ..replay import ReplayBuffer

        self.buf = ReplayBuffer(capacity, obs_shape, self.obs_dtype, frame_stack=frame_stack, num_envs=num_envs, seed=seed,
                                **self._features())
        self.window = False
        self.out: Dict[int, object] = {}
        self.last = None

    def _features(self) -> dict:
        return dict(prioritized=True, alpha=ALPHA, priority_eps=EPS)

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return _core_lacks_features()

    def sample(self, batch):
        out = self.out.get(batch)
        if out is None:
            out = self.out[batch] = self.buf.empty_batch(batch, torch=True)
        self.buf.sample_into(out, beta=BETA)
        self.last = out
        return out.obs, out.action, out.reward, out.next_obs, out.terminated, self._last_field(out)

    def _last_field(self, out):
        return out.weights

    def update(self, priorities):
        self.buf.update_priorities(self.last.ids, priorities)


class DqnFastNStep(DqnFastPrioritized):
    name = "dqn_fast n-step"
    kind = "nstep"

    def _features(self):
        return dict(n_step=N_STEP, gamma=GAMMA)

    def _last_field(self, out):
        return out.discount


# --------------------------------------------------------------------------- cpprb
class CpprbPrioritized(P.CpprbCompressed):
    """cpprb.PrioritizedReplayBuffer with next_of="obs" and stack_compress="obs"
    (stack axis last, on_episode_end() after each episode), as cpprb's
    documentation combines them; one sequential stream."""

    name = "cpprb Prioritized (next_of+stack_compress)"
    kind = "per"
    exactness = "weights are cpprb's own (not checked against the formula)"

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        P.Peer.__init__(self, capacity, obs_shape, frame_stack, num_envs, seed)
        import cpprb

        np.random.seed(seed)
        shape = (*self.obs_shape[1:], self.obs_shape[0]) if self.uint8 else self.obs_shape
        compress = {"stack_compress": "obs"} if self.uint8 else {}
        self.rb = cpprb.PrioritizedReplayBuffer(capacity, {"obs": {"shape": shape, "dtype": self.obs_dtype}, **P._CPPRB_FIELDS},
                                                next_of="obs", alpha=ALPHA, eps=EPS, **compress)
        self.last = None

    @classmethod
    def unavailable(cls):
        return None

    def sample(self, batch):
        torch = P._torch()
        s = self.rb.sample(batch, beta=BETA)
        self.last = s["indexes"]
        obs, nxt = torch.from_numpy(s["obs"]), torch.from_numpy(s["next_obs"])
        if self.uint8:
            obs, nxt = obs.permute(0, 3, 1, 2), nxt.permute(0, 3, 1, 2)
        return (*P._cpprb_tensors(s, obs, nxt), torch.from_numpy(s["weights"]))

    def update(self, priorities):
        self.rb.update_priorities(self.last, priorities)


class CpprbNstep(P.Cpprb):
    """cpprb.ReplayBuffer(Nstep={"size": 3, "gamma": 0.99, "rew": "rew",
    "next": "next_obs"}), on_episode_end() after each episode: one stream."""

    name = "cpprb Nstep"
    kind = "nstep"
    max_envs = 1
    exactness = "no discount returned (gamma**m for a shortened window is the learner's guess)"

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0, compressed=False):
        P.Peer.__init__(self, capacity, obs_shape, frame_stack, num_envs, seed)
        import cpprb

        np.random.seed(seed)
        nstep = {"size": N_STEP, "gamma": GAMMA, "rew": "rew", "next": "next_obs"}
        obs = {"shape": self.obs_shape, "dtype": self.obs_dtype}
        if compressed:  # what its docs recommend for frame stacks
            obs = {"shape": (*self.obs_shape[1:], self.obs_shape[0]), "dtype": self.obs_dtype}
            self.rb = cpprb.ReplayBuffer(capacity, {"obs": obs, **P._CPPRB_FIELDS}, Nstep=nstep, next_of="obs",
                                         stack_compress="obs")
        else:
            self.rb = cpprb.ReplayBuffer(capacity, {"obs": obs, "next_obs": obs, **P._CPPRB_FIELDS}, Nstep=nstep)
        self.compressed = compressed

    def add(self, obs, action, reward, next_obs, terminated, truncated):
        if self.compressed:
            obs, next_obs = np.moveaxis(obs, 0, -1), np.moveaxis(next_obs, 0, -1)
        self.rb.add(obs=obs, act=action, rew=reward, next_obs=next_obs, done=terminated)
        if terminated or truncated:
            self.rb.on_episode_end()

    def sample(self, batch):
        return (*super().sample(batch), None)

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Checked on a small frame-stack stream: what it returns must be what was added."""
        from .streams import AtariEnvs

        problems = []
        for compressed in (True, False):
            envs = AtariEnvs(1, seed=0, min_len=2, max_len=12, frame=(6, 7), pool_size=200)
            peer = cls(40, envs.obs_shape, envs.k, 1, compressed=compressed)
            added = set()
            for _ in range(60):
                step = envs.step()
                added.update(f.tobytes() for f in step[3][0])
                peer.add(*P.unbatched(step))
            s = peer.rb.sample(64)
            if "next_obs" not in s:
                problems.append(f"with next_of+stack_compress its batches have no next_obs (keys: {sorted(s)})")
                continue
            nxt = s["next_obs"] if not compressed else np.moveaxis(s["next_obs"], -1, 1)
            alien = sum(any(f.tobytes() not in added for f in row) for row in nxt)
            if alien:
                problems.append(f"with plain stacked storage {alien} of 64 sampled next_obs hold frames never added")
        return ("unavailable with frame stacks: " + "; ".join(problems)) if len(problems) == 2 else None


# --------------------------------------------------------------------------- Tianshou
class TianshouPrioritized(P.Tianshou):
    """tianshou.data.PrioritizedReplayBuffer(alpha, beta, stack_num=4,
    ignore_obs_next=True, save_only_last_obs=True), update_weight(indices, p)."""

    name = "Tianshou Prioritized"
    kind = "per"
    exactness = (P.Tianshou.exactness + "; weights normalised by the batch's maximum, draws not stratified, "
                 "float32 eps added to priorities")

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        P.Peer.__init__(self, capacity, obs_shape, frame_stack, num_envs, seed)
        from tianshou.data import PrioritizedReplayBuffer, PrioritizedVectorReplayBuffer

        np.random.seed(seed)  # Tianshou's prioritized draws use numpy's global generator
        kwargs = dict(alpha=ALPHA, beta=BETA)
        if self.k > 1:
            kwargs.update(stack_num=self.k, ignore_obs_next=True, save_only_last_obs=True)
        else:
            self.exactness = "weights normalised by the batch's maximum, draws not stratified"
        self.rb = (PrioritizedReplayBuffer(capacity, **kwargs) if num_envs == 1
                   else PrioritizedVectorReplayBuffer(capacity, num_envs, **kwargs))
        self.ids = np.arange(num_envs)
        self.last = None

    @classmethod
    def unavailable(cls):
        return None

    def sample(self, batch):
        torch = P._torch()
        b, self.last = self.rb.sample(batch)
        return (torch.from_numpy(b.obs), torch.from_numpy(b.act), torch.from_numpy(b.rew), torch.from_numpy(b.obs_next),
                torch.from_numpy(b.terminated), torch.from_numpy(np.asarray(b.weight)))

    def update(self, priorities):
        self.rb.update_weight(self.last, priorities)


# --------------------------------------------------------------------------- TorchRL
class TorchRLPrioritized(P.TorchRL):
    """torchrl.data.TensorDictPrioritizedReplayBuffer over a LazyTensorStorage
    (priority_key "td_error"), as TorchRL's DQN examples build it; priorities
    go back with update_priority(index, priority)."""

    name = "TorchRL TensorDictPrioritized"
    kind = "per"

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        P.Peer.__init__(self, capacity, obs_shape, frame_stack, num_envs, seed)
        import torch
        from torchrl.data import LazyTensorStorage, TensorDictPrioritizedReplayBuffer

        logging.getLogger("torchrl").setLevel(logging.ERROR)
        torch.manual_seed(seed)
        self.rb = TensorDictPrioritizedReplayBuffer(alpha=ALPHA, beta=BETA, eps=EPS, storage=LazyTensorStorage(capacity),
                                                    priority_key="td_error")
        self.last = None

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """The exception its construction raises here, with the extension's import error."""
        try:
            cls(8, (2,), 1, 1)
        except Exception as exc:  # reported verbatim
            reason = f"{type(exc).__name__}: {exc}"
            try:
                import torchrl._torchrl  # noqa: F401  (the C++ extension holding the segment trees)
            except Exception as cause:
                reason += f" (torchrl._torchrl: {type(cause).__name__}: {cause})"
            return "unavailable: " + reason
        return None

    def sample(self, batch):
        s = self.rb.sample(batch)
        self.last = s["index"]
        return s["obs"], s["action"], s["reward"], s["next", "obs"], s["next", "terminated"], s["priority_weight"]

    def update(self, priorities):
        self.rb.update_priority(self.last, P._torch().as_tensor(priorities))


# --------------------------------------------------------------------------- Stable-Baselines3
class SB3NStep(P.SB3):
    """stable_baselines3.common.buffers.NStepReplayBuffer(n_steps=3, gamma=0.99),
    timeouts handled, as SB3's DQN(n_steps=3) builds it."""

    name = "SB3 NStepReplayBuffer"
    kind = "nstep"

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        P.Peer.__init__(self, capacity, obs_shape, frame_stack, num_envs, seed)
        from gymnasium import spaces
        from stable_baselines3.common.buffers import NStepReplayBuffer

        space = (spaces.Box(0, 255, self.obs_shape, np.uint8) if self.uint8
                 else spaces.Box(-np.inf, np.inf, self.obs_shape, np.float32))
        np.random.seed(seed)
        self.rb = NStepReplayBuffer(capacity, space, spaces.Discrete(6), "cpu", n_envs=num_envs,
                                    handle_timeout_termination=True, n_steps=N_STEP, gamma=GAMMA)

    @classmethod
    def unavailable(cls):
        return None

    def sample(self, batch):
        s = self.rb.sample(batch)
        return (s.observations, s.actions.flatten(), s.rewards.flatten(), s.next_observations, s.dones.flatten(),
                s.discounts.flatten())


PER: List[Type[P.Peer]] = [DqnFastPrioritized, CpprbPrioritized, TianshouPrioritized, TorchRLPrioritized]
NSTEP: List[Type[P.Peer]] = [DqnFastNStep, SB3NStep, CpprbNstep]
BY_NAME: Dict[str, Type[P.Peer]] = {p.name: p for p in PER + NSTEP}
