"""End-to-end Atari training speed: `dqn_fast.train` against a CleanRL-style loop.

The baseline is what a CleanRL dqn_atari-style script does: one
gymnasium-wrapped env (AtariPreprocessing + FrameStackObservation), acting
on one observation at a time, Stable-Baselines3's ReplayBuffer sampled
synchronously, torch's default thread count, plain Adam. Both use the same
Nature CNN and the same hyperparameters (batch 32, one update per 4 env
steps, Adam lr 1e-4, target sync every 1,000 updates). Only the learning
phase is timed: each side first fills `learning_starts` steps untimed.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from .timing import median

ENV_ID = "ALE/Pong-v5"


def ours(steps: int, learning_starts: int = 1000, torch_threads: int = 0, num_envs: int = 4, device: str = "cpu",
         prefetch_depth: int = 2) -> dict:
    from ..train import Config, Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = Config.for_env(
            ENV_ID,
            total_steps=learning_starts + steps,
            num_envs=num_envs,
            buffer_size=max(10_000, learning_starts + steps),
            learning_starts=learning_starts,
            log_interval=learning_starts,  # a row when learning starts, then at the end
            checkpoint_interval=10**12,
            run_dir=run_dir,
            progress=False,
            torch_threads=torch_threads,
            device=device,
            prefetch_depth=prefetch_depth,
        )
        trainer = Trainer(cfg)
        summary = trainer.run()
        rows = [r.split(",") for r in open(os.path.join(run_dir, "progress.csv")).read().splitlines()[1:]]
    (s0, t0), (s1, t1) = (float(rows[0][0]), float(rows[0][1])), (float(rows[-1][0]), float(rows[-1][1]))
    return {
        "steps_per_s": (s1 - s0) / (t1 - t0),
        "replay_share": summary["replay_share"],
        "torch_threads": summary["torch_threads"],
        "updates": summary["updates"],
    }


def cleanrl_style(steps: int, learning_starts: int = 1000, seed: int = 1, device: str = "cpu") -> dict:
    import ale_py
    import gymnasium as gym
    import torch.nn.functional as F
    from stable_baselines3.common.buffers import ReplayBuffer as SB3ReplayBuffer

    from ..networks import NatureCNN

    torch.set_num_threads(os.cpu_count() or 1)  # torch's default: one thread per core
    gym.register_envs(ale_py)
    env = gym.make(ENV_ID, frameskip=1, repeat_action_probability=0.0)
    env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, terminal_on_life_loss=True)
    env = gym.wrappers.FrameStackObservation(env, 4)
    q, target = NatureCNN(4, env.action_space.n).to(device), NatureCNN(4, env.action_space.n).to(device)
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-4)
    rb = SB3ReplayBuffer(learning_starts + steps, env.observation_space, env.action_space, device, handle_timeout_termination=False)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    updates, t_start, sample_s = 0, None, 0.0
    for step in range(learning_starts + steps):
        if step == learning_starts:
            t_start = time.perf_counter()
        epsilon = max(0.01, 1.0 - step / 100_000)
        if rng.random() < epsilon:
            action = int(rng.integers(env.action_space.n))
        else:
            with torch.no_grad():
                action = int(q(torch.as_tensor(obs, device=device).unsqueeze(0)).argmax(1).item())
        next_obs, reward, terminated, truncated, info = env.step(action)
        rb.add(obs, next_obs, np.array([action]), np.array([np.sign(reward)]), np.array([terminated]), [info])
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
        if step >= learning_starts and step % 4 == 0:
            t0 = time.perf_counter()
            data = rb.sample(32)
            sample_s += time.perf_counter() - t0
            with torch.no_grad():
                y = data.rewards.flatten() + 0.99 * target(data.next_observations).max(1).values * (1 - data.dones.flatten())
            loss = F.smooth_l1_loss(q(data.observations).gather(1, data.actions).squeeze(1), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(q.parameters(), 10.0)
            optimizer.step()
            updates += 1
            if updates % 1000 == 0:
                target.load_state_dict(q.state_dict())
    if device != "cpu":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    env.close()
    return {"steps_per_s": steps / elapsed, "sample_share": sample_s / elapsed, "torch_threads": torch.get_num_threads(), "updates": updates}


def bench_train_speed(quick: bool) -> dict:
    """Interleaved repeats of both loops; medians and the ratio."""
    steps = 400 if quick else 1200
    repeats = 2 if quick else 3
    threads_before = torch.get_num_threads()
    runs = {"dqn_fast": [], "cleanrl_style_sb3": []}
    try:
        for _ in range(repeats):
            runs["dqn_fast"].append(ours(steps))
            runs["cleanrl_style_sb3"].append(cleanrl_style(steps))
    finally:
        torch.set_num_threads(threads_before)
    result = {name: {"steps_per_s": median([r["steps_per_s"] for r in rs]), "repeats": rs} for name, rs in runs.items()}
    result["speedup"] = result["dqn_fast"]["steps_per_s"] / result["cleanrl_style_sb3"]["steps_per_s"]
    result["dqn_fast"]["replay_share"] = median([r["replay_share"] for r in runs["dqn_fast"]])
    result["env"] = ENV_ID
    result["timed_steps"] = steps
    return result
