"""Training: a config dataclass, per-env recipes, and `train(config)`.

The loop, per iteration: act on all envs with one batched forward pass, step
them, add one transition per env to the replay buffer, and run the learner
updates that are due (one per `train_freq` env steps after `learning_starts`),
fed by the prefetcher. `global_step` counts env steps over all envs.

With `prioritized`, each update's |TD errors| go back to the buffer through
the prefetcher (one update late, see dqn_fast/prefetch.py), and the
importance-weight exponent beta grows linearly from `beta0` at step 0 to 1 at
`total_steps`. With `n_step` > 1 the buffer returns n-step returns and each
sample's bootstrap discount gamma**m.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
import warnings
from collections import deque
from typing import List, Optional

import numpy as np
import torch

from .agent import DQNAgent, linear_epsilon
from .config import Config
from .envs import VecEnv, make_env
from .logs import RunLogger
from .prefetch import Prefetcher
from .replay import ReplayBuffer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device; use --device cpu")
    return device


class ThreadTuner:
    """Chooses torch's CPU thread count by measuring updates, again and again.

    On a quiet 2-core machine two threads make a Nature-CNN update ~1.6x
    faster than one; when another process keeps a core busy, the second
    thread can make it several times slower. So with `torch_threads=0` each
    candidate count runs a few updates, the fastest (median) is kept for the
    next `every` updates, and then the trial repeats. A fixed count skips all
    this.
    """

    def __init__(self, requested: int, trial: int = 6, every: int = 2_000, clock=time.perf_counter):
        cores = os.cpu_count() or 1
        self.clock = clock
        self.candidates = [requested] if requested > 0 else sorted({1, max(1, cores - 1), cores})
        self.trial, self.every = trial, every
        self.times = {c: [] for c in self.candidates}
        self.chosen = self.candidates[-1]
        self.count = 0
        torch.set_num_threads(self.chosen)

    def _current(self) -> int:
        cycle = len(self.candidates) * self.trial + self.every
        phase = self.count % cycle
        return self.candidates[phase // self.trial] if phase < len(self.candidates) * self.trial else self.chosen

    def run(self, update):
        """Runs update() under the thread count due now; returns its result."""
        if len(self.candidates) == 1:
            return update()
        threads = self._current()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        start = self.clock()
        result = update()
        trial = self.count % (len(self.candidates) * self.trial + self.every) < len(self.candidates) * self.trial
        if trial:
            self.times[threads].append(self.clock() - start)
            if all(len(t) >= self.trial for t in self.times.values()):
                self.chosen = min(self.candidates, key=lambda c: float(np.median(self.times[c])))
                self.times = {c: [] for c in self.candidates}
        self.count += 1
        return result


def replay_options(cfg: Config) -> dict:
    """The buffer's n-step, prioritized-replay and compression arguments for `cfg`."""
    compress = None if cfg.compress in (None, "", "none") else cfg.compress
    return dict(
        n_step=cfg.n_step, gamma=cfg.gamma, prioritized=cfg.prioritized, alpha=cfg.alpha, priority_eps=cfg.priority_eps,
        compression=compress, frame_memory=(cfg.frame_memory or None) if compress else None,
    )


def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoint.pt")


def buffer_path(run_dir: str) -> str:
    return os.path.join(run_dir, "replay.dqnf")


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write never
    destroys the last good checkpoint."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Trainer:
    """State of one run; `train(config)` is the public entry point."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.num_envs < 1 or cfg.total_steps < 1 or cfg.batch_size < 1 or cfg.train_freq < 1:
            raise ValueError("num_envs, total_steps, batch_size and train_freq must be positive")
        if not 0.0 <= cfg.beta0 <= 1.0:
            raise ValueError(f"beta0 must be in [0, 1] (it is annealed to 1), got {cfg.beta0}")
        self.run_dir = cfg.run_dir or os.path.join("runs", f"{cfg.env.replace('/', '_')}__{cfg.seed}")
        os.makedirs(self.run_dir, exist_ok=True)
        self.device = resolve_device(cfg.device)
        # Timing updates only means something where they run synchronously.
        self.threads = ThreadTuner(cfg.torch_threads if self.device.type == "cpu" else max(1, cfg.torch_threads))
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.envs: VecEnv = make_env(cfg.env, cfg.num_envs, training=True)
        self.buffer = ReplayBuffer(
            cfg.buffer_size,
            self.envs.obs_shape,
            self.envs.obs_dtype,
            frame_stack=self.envs.frame_stack,
            num_envs=cfg.num_envs,
            seed=cfg.seed,
            **replay_options(cfg),
        )
        self.agent = DQNAgent(self.envs.obs_shape, self.envs.n_actions, cfg.learner(), self.device, cfg.hidden, cfg.dueling)
        self.global_step = 0
        self.games = 0
        self.learning_starts = cfg.learning_starts
        self.start_updates = 0
        self.prefetcher: Optional[Prefetcher] = None

    # --------------------------------------------------------------- checkpoint
    def save(self) -> None:
        if self.cfg.save_buffer:
            # Buffer first: a checkpoint never names a buffer file older than itself.
            if self.prefetcher is not None:
                self.prefetcher.barrier()
            self.buffer.save(buffer_path(self.run_dir))
        # The last update's priorities are not in the buffer yet (one update
        # late): kept here and applied on resume, so the file is complete.
        pending = self.prefetcher.pending_priorities() if self.prefetcher is not None else None
        state = {
            "buffer_adds": self.buffer.total_adds if self.cfg.save_buffer else None,
            "pending_priorities": pending if self.cfg.save_buffer else None,
            "config": dataclasses.asdict(self.cfg),
            "agent": self.agent.state_dict(),
            "global_step": self.global_step,
            "games": self.games,
            "learning_starts": self.learning_starts,
            "start_updates": self.start_updates,
            "rng": {
                "numpy": self.rng.bit_generator.state,
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
            },
            "obs_shape": self.envs.obs_shape,
            "n_actions": self.envs.n_actions,
        }
        atomic_save(state, checkpoint_path(self.run_dir))

    def restore(self) -> bool:
        path = checkpoint_path(self.run_dir)
        if not os.path.exists(path):
            return False
        # Loaded on the CPU: the RNG state must stay a CPU tensor, and the
        # agent's load_state_dict copies weights to wherever its nets live,
        # so a run saved on a GPU resumes on a CPU and the other way round.
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.agent.load_state_dict(state["agent"])
        self.global_step = int(state["global_step"])
        self.games = int(state["games"])
        self.rng.bit_generator.state = state["rng"]["numpy"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if self.cfg.save_buffer and self._restore_buffer(state.get("buffer_adds")):
            pending = state.get("pending_priorities")
            if pending is not None:
                self.buffer.update_priorities(*pending)
            self.learning_starts = int(state["learning_starts"])
            self.start_updates = int(state["start_updates"])
            return True
        # The buffer starts empty again: refill before learning resumes, and
        # keep the update schedule relative to that point.
        self.learning_starts = self.global_step + min(self.cfg.learning_starts, self.cfg.buffer_size)
        self.start_updates = self.agent.updates
        return True

    def _restore_buffer(self, expected_adds) -> bool:
        path = buffer_path(self.run_dir)
        if expected_adds is None or not os.path.exists(path):
            return False
        buffer = ReplayBuffer.load(path)
        def layout(b):  # what the run's samples depend on (gamma: n-step rewards; alpha, eps: priorities)
            n_step, prioritized = getattr(b, "n_step", 1), getattr(b, "prioritized", False)
            return (
                (b.capacity, b.num_envs, b.obs_shape, n_step, prioritized)
                + ((b.gamma,) if n_step > 1 else ())
                + ((b.alpha, b.priority_eps) if prioritized else ())
            )

        same = layout(buffer) == layout(self.buffer)
        if not same or buffer.total_adds != expected_adds:
            warnings.warn(f"{path} does not match the checkpoint or the config; refilling the buffer instead")
            return False
        self.buffer = buffer
        return True

    # --------------------------------------------------------------------- loop
    def epsilon(self) -> float:
        cfg = self.cfg
        return linear_epsilon(self.global_step, cfg.eps_start, cfg.eps_end, int(cfg.exploration_fraction * cfg.total_steps))

    def beta(self) -> float:
        """Importance-weight exponent now: beta0 at step 0, 1 at total_steps."""
        cfg = self.cfg
        return cfg.beta0 + (1.0 - cfg.beta0) * min(1.0, self.global_step / cfg.total_steps)

    def updates_due(self) -> int:
        if self.global_step < self.learning_starts or len(self.buffer) < self.cfg.batch_size:
            return 0
        target = (self.global_step - self.learning_starts) // self.cfg.train_freq + 1
        return max(0, target - (self.agent.updates - self.start_updates))

    def run(self, on_step=None) -> dict:
        """Trains to cfg.total_steps. on_step(trainer), if given, runs after
        every iteration (act, add, updates); returning True ends the run there."""
        cfg = self.cfg
        resumed = cfg.resume and self.restore()
        logger = RunLogger(self.run_dir, cfg.total_steps, self.global_step, progress=cfg.progress, log_every=cfg.log_interval)
        prefetcher = self.prefetcher = Prefetcher(self.buffer, cfg.batch_size, self.device, cfg.prefetch_depth, cfg.window)
        ep_return = np.zeros(cfg.num_envs)
        ep_length = np.zeros(cfg.num_envs, dtype=np.int64)
        recent: deque = deque(maxlen=20)
        replay_seconds = 0.0
        losses: List[torch.Tensor] = []
        next_checkpoint = (self.global_step // cfg.checkpoint_interval + 1) * cfg.checkpoint_interval
        obs = self.envs.reset(seed=cfg.seed + self.global_step)
        start = time.perf_counter()
        try:
            while self.global_step < cfg.total_steps:
                actions = self.agent.act(obs, self.epsilon(), self.rng)
                step = self.envs.step(actions)
                reward = np.sign(step.reward) if cfg.clip_rewards else step.reward
                t0 = time.perf_counter()
                prefetcher.barrier()  # batches asked for are drawn before the buffer changes
                self.buffer.add(obs, actions, reward.astype(np.float32), step.next_obs, step.terminated, step.truncated)
                replay_seconds += time.perf_counter() - t0
                obs = step.obs
                self.global_step += cfg.num_envs
                ep_return += step.reward
                ep_length += 1
                for e in np.flatnonzero(step.game_over):
                    recent.append(ep_return[e])
                    logger.episode(self.global_step, float(ep_return[e]), int(ep_length[e]))
                    self.games += 1
                    ep_return[e], ep_length[e] = 0.0, 0

                for _ in range(self.updates_due()):
                    b = prefetcher.next(self.beta())
                    weights = b.weights if cfg.prioritized else None  # all 1 otherwise
                    discount = b.discount if cfg.n_step > 1 else None  # gamma otherwise
                    loss, td = self.threads.run(lambda: self.agent.train_step(b.obs, b.action, b.reward, b.next_obs, b.terminated, weights, discount))
                    losses.append(loss)
                    if cfg.prioritized:
                        prefetcher.update_priorities(td)

                if logger.due(self.global_step) or self.global_step >= cfg.total_steps:
                    elapsed = time.perf_counter() - start
                    loss = torch.stack(losses).mean().item() if losses else float("nan")
                    losses.clear()
                    logger.log(
                        self.global_step,
                        loss=loss,
                        epsilon=self.epsilon(),
                        mean_return=float(np.mean(recent)) if recent else float("nan"),
                        games=self.games,
                        updates=self.agent.updates,
                        buffer_len=len(self.buffer),
                        replay_share=(replay_seconds + prefetcher.wait_seconds) / max(elapsed, 1e-9),
                    )
                if self.global_step >= next_checkpoint:
                    self.save()
                    next_checkpoint += cfg.checkpoint_interval
                if on_step is not None and on_step(self):
                    break
            elapsed = time.perf_counter() - start
            self.save()
        finally:
            prefetcher.close()
            logger.close()
            self.envs.close()
        summary = {
            "env": cfg.env,
            "steps": self.global_step,
            "updates": self.agent.updates,
            "games": self.games,
            "mean_return_last_20": float(np.mean(recent)) if recent else None,
            "seconds": elapsed,
            "steps_per_s": (self.global_step - logger.first_step) / max(elapsed, 1e-9),
            "replay_share": (replay_seconds + prefetcher.wait_seconds) / max(elapsed, 1e-9),
            "resumed": bool(resumed),
            "checkpoint": checkpoint_path(self.run_dir),
            "torch_threads": self.threads.chosen,
            "device": str(self.device),
        }
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        return summary


def train(config: Config) -> dict:
    """Trains a DQN as `config` says; returns a summary (also in run_dir/summary.json)."""
    return Trainer(config).run()


def evaluate(checkpoint: str, episodes: int = 10, seed: int = 1_000_003, epsilon: Optional[float] = None, device: str = "auto") -> dict:
    """Plays `episodes` full episodes (whole games for Atari, raw scores) with
    the checkpoint's online network, epsilon-greedy with the eval epsilon."""
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    dev = resolve_device(device)
    state = torch.load(checkpoint, map_location=dev, weights_only=False)
    cfg = Config(**{k: v for k, v in state["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})
    eps = cfg.eval_epsilon if epsilon is None else epsilon
    agent = DQNAgent(state["obs_shape"], state["n_actions"], cfg.learner(), dev, cfg.hidden, cfg.dueling)
    agent.load_state_dict(state["agent"])
    returns = play(agent, cfg.env, episodes, seed, eps)
    return {
        "env": cfg.env,
        "episodes": episodes,
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "returns": returns,
        "epsilon": eps,
        "checkpoint_step": int(state["global_step"]),
    }


def play(agent: DQNAgent, env: str, episodes: int, seed: int = 1_000_003, epsilon: float = 0.0) -> List[float]:
    """Returns of `episodes` evaluation episodes (full games, raw scores) played
    by `agent`, epsilon-greedy, with a generator of its own."""
    rng = np.random.default_rng(seed)
    returns: List[float] = []
    while len(returns) < episodes:
        # Each env of a round plays exactly one episode: no bias toward short ones.
        n = min(episodes - len(returns), 16)
        envs = make_env(env, n, training=False)
        obs = envs.reset(seed=seed + len(returns))
        totals, done = np.zeros(n), np.zeros(n, bool)
        while not done.all():
            step = envs.step(agent.act(obs, epsilon, rng))
            totals += np.where(done, 0.0, step.reward)
            done |= step.game_over
            obs = step.obs
        envs.close()
        returns.extend(totals.tolist())
    return returns
