"""Training configuration: the `Config` dataclass and the per-env recipes.

Kept free of torch so the command line can list every flag without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .envs import is_atari


@dataclass
class Config:
    env: str = "CartPole-v1"
    total_steps: int = 50_000
    num_envs: int = 1
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    run_dir: Optional[str] = None  # default: runs/<env>__<seed>
    # replay
    buffer_size: int = 50_000
    batch_size: int = 64
    learning_starts: int = 1_000
    train_freq: int = 1  # env steps per learner update
    n_step: int = 1  # n-step returns (window length, cut at episode ends)
    prioritized: bool = False  # proportional prioritized replay (Schaul et al. 2016)
    alpha: float = 0.6  # priority exponent
    beta0: float = 0.4  # importance-weight exponent at the start, annealed linearly to 1 at total_steps
    priority_eps: float = 1e-6  # added to |TD error| by the buffer
    compress: Optional[str] = None  # None | "lz4" | "zstd": the compressed frame store
    frame_memory: int = 0  # compressed: bytes the frames may take (0: the buffer's default)
    # learner
    lr: float = 1e-3
    gamma: float = 0.99
    optimizer: str = "adam"
    loss: str = "mse"
    double_dqn: bool = True
    max_grad_norm: float = 10.0
    target_update_interval: int = 1  # learner updates between target syncs
    tau: float = 0.005  # 1.0: hard copy
    hidden: Sequence[int] = (128,)
    dueling: bool = False  # dueling head: V + A - mean(A) (Wang et al. 2016)
    # exploration
    eps_start: float = 1.0
    eps_end: float = 0.05
    exploration_fraction: float = 0.2  # of total_steps
    clip_rewards: bool = False
    # pipeline and runtime
    prefetch_depth: int = 2
    window: bool = True
    torch_threads: int = 0  # 0: tuned by measuring updates (ThreadTuner)
    log_interval: int = 5_000
    checkpoint_interval: int = 50_000
    save_buffer: bool = False  # checkpoints include the replay buffer (run_dir/replay.dqnf)
    eval_episodes: int = 10
    eval_epsilon: float = 0.0
    resume: bool = False
    progress: bool = True

    @classmethod
    def for_env(cls, env: str, **overrides) -> "Config":
        """The recipe for `env` (see RECIPES), with overrides on top."""
        values = dict(ATARI if is_atari(env) else RECIPES.get(env, {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(env=env, **values)

    def learner(self):
        from .agent import LearnerConfig  # torch is only needed to train

        return LearnerConfig(
            gamma=self.gamma,
            lr=self.lr,
            optimizer=self.optimizer,
            loss=self.loss,
            double_dqn=self.double_dqn,
            max_grad_norm=self.max_grad_norm,
            target_update_interval=self.target_update_interval,
            tau=self.tau,
        )


# Atari: CleanRL's dqn_atari / Nature DQN (target sync counted in learner updates).
ATARI = dict(
    total_steps=10_000_000,
    num_envs=4,
    buffer_size=1_000_000,
    batch_size=32,
    learning_starts=80_000,
    train_freq=4,
    lr=1e-4,
    gamma=0.99,
    optimizer="adam",
    loss="huber",
    double_dqn=False,
    max_grad_norm=10.0,
    target_update_interval=1_000,
    tau=1.0,
    eps_start=1.0,
    eps_end=0.01,
    exploration_fraction=0.10,
    clip_rewards=True,
    log_interval=20_000,
    checkpoint_interval=250_000,
    eval_episodes=10,
    eval_epsilon=0.05,
)

# CartPole-v1: n-step 3 + prioritized replay, tuned (2026-12-03, 2-core x86_64,
# shared) so that every seed reaches an evaluation mean >= 475 within 100k env
# steps and 60 s: seeds 1-3 did at 32.5k, 40k and 42.5k steps, in 26-30 s at
# 1,200-1,400 env steps/s, and in 45-55 s in the README's learning-curves run
# (a busier machine). The same recipe with uniform one-step replay: see there.
RECIPES = {
    "CartPole-v1": dict(
        total_steps=60_000,  # also where beta reaches 1
        num_envs=1,
        buffer_size=50_000,
        batch_size=128,
        learning_starts=1_000,
        train_freq=1,
        n_step=3,
        prioritized=True,
        alpha=0.6,
        beta0=0.4,
        lr=1e-3,
        loss="huber",
        double_dqn=True,
        target_update_interval=1,
        tau=0.01,
        eps_end=0.05,
        exploration_fraction=0.2,
        log_interval=5_000,
        checkpoint_interval=25_000,
        eval_episodes=20,
        torch_threads=1,  # a 128-unit MLP gains nothing from more; one count keeps runs reproducible
    ),
}
