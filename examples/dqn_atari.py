"""DQN on Atari in one file, in the style of CleanRL's dqn_atari.py, on dqn_fast's replay buffer.

    python examples/dqn_atari.py --env-id BreakoutNoFrameskip-v4 --total-timesteps 10000000
    python examples/dqn_atari.py --total-timesteps 500 --learning-starts 100 --cuda false   # smoke run

What differs from CleanRL: the replay buffer is ``dqn_fast.ReplayBuffer``, which stores each
frame once (7.4 GB for 1M transitions instead of 28-56 GB) and samples in native code into
one preallocated (pinned, on CUDA) batch of k+1 frames per transition; the env wrappers
are gymnasium 1.x's. ``--save-buffer``/``--load-buffer`` keep the buffer across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dqn_fast


@dataclass
class Args:
    env_id: str = "BreakoutNoFrameskip-v4"
    seed: int = 1
    num_envs: int = 1
    total_timesteps: int = 10_000_000
    learning_rate: float = 1e-4
    buffer_size: int = 1_000_000
    gamma: float = 0.99
    tau: float = 1.0  # target network update rate
    target_network_frequency: int = 1000
    batch_size: int = 32
    start_e: float = 1.0
    end_e: float = 0.01
    exploration_fraction: float = 0.10
    learning_starts: int = 80_000
    train_frequency: int = 4
    cuda: bool = True
    torch_threads: int = 0  # 0: torch's default
    save_buffer: str = ""  # save the replay buffer here at the end
    load_buffer: str = ""  # start from a saved replay buffer


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Args):
        kind = type(field.default)
        parse = (lambda s: s.lower() in ("1", "true", "yes")) if kind is bool else kind
        parser.add_argument("--" + field.name.replace("_", "-"), type=parse, default=field.default)
    return Args(**vars(parser.parse_args()))


def make_env(env_id: str):
    def thunk():
        env = gym.make(env_id, frameskip=1)  # AtariPreprocessing skips frames itself
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84)
        env = gym.wrappers.ClipReward(env, -1, 1)
        return gym.wrappers.FrameStackObservation(env, 4)  # (4, 84, 84) uint8

    return thunk


class QNetwork(nn.Module):
    def __init__(self, n_actions: int):
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, n_actions),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.float() / 255.0)


def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    return max(start_e + (end_e - start_e) * t / duration, end_e)


def main() -> None:
    args = parse_args()
    import ale_py

    gym.register_envs(ale_py)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # SAME_STEP autoreset: a finished episode's true final obs comes in infos["final_obs"].
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id) for _ in range(args.num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    q_network = QNetwork(envs.single_action_space.n).to(device)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    target_network = QNetwork(envs.single_action_space.n).to(device)
    target_network.load_state_dict(q_network.state_dict())

    if args.load_buffer:
        rb = dqn_fast.ReplayBuffer.load(args.load_buffer)
    else:
        rb = dqn_fast.ReplayBuffer(
            args.buffer_size, envs.single_observation_space.shape, np.uint8,
            frame_stack=4, num_envs=args.num_envs, seed=args.seed,
        )
    # One batch, allocated once: frames[:, :4] is obs, frames[:, 1:] next_obs.
    batch = rb.empty_batch(args.batch_size, window=True, torch=True, pin_memory=device.type == "cuda")
    start_time = time.time()

    obs, _ = envs.reset(seed=args.seed)
    for step in range(args.total_timesteps // args.num_envs):
        global_step = step * args.num_envs
        duration = args.exploration_fraction * args.total_timesteps
        epsilon = linear_schedule(args.start_e, args.end_e, duration, global_step)
        if random.random() < epsilon:
            actions = envs.action_space.sample()
        else:
            with torch.no_grad():
                actions = q_network(torch.as_tensor(obs, device=device)).argmax(dim=1).cpu().numpy()
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)

        if "final_info" in infos and "episode" in infos["final_info"]:
            episode = infos["final_info"]["episode"]
            for i in np.flatnonzero(infos["final_info"]["_episode"]):
                print(f"global_step={global_step}, episodic_return={episode['r'][i]:.0f}, length={episode['l'][i]}")

        real_next_obs = next_obs.copy()  # an ended episode's next_obs is its final obs, not the reset
        for i in np.flatnonzero(infos.get("_final_obs", ())):
            real_next_obs[i] = infos["final_obs"][i]
        rb.add(obs, actions, rewards, real_next_obs, terminations, truncations)
        obs = next_obs

        if global_step > args.learning_starts and step % args.train_frequency == 0:
            rb.sample_into(batch)
            frames = batch.frames.to(device)  # k+1 frames per transition instead of 2k
            action = batch.action.to(device)
            reward = batch.reward.to(device)
            terminated = batch.terminated.to(device).float()
            with torch.no_grad():
                target_max = target_network(frames[:, 1:]).max(dim=1).values
                td_target = reward + args.gamma * target_max * (1 - terminated)
            old_val = q_network(frames[:, :-1]).gather(1, action.unsqueeze(1)).squeeze(1)
            loss = F.mse_loss(td_target, old_val)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0:
                sps = int(global_step / (time.time() - start_time))
                print(f"global_step={global_step}, td_loss={loss.item():.4f}, q={old_val.mean().item():.3f}, SPS={sps}")

        if step % args.target_network_frequency == 0:
            for target, online in zip(target_network.parameters(), q_network.parameters()):
                target.data.copy_(args.tau * online.data + (1.0 - args.tau) * target.data)

    if args.save_buffer:
        rb.save(args.save_buffer)
        print(f"saved {len(rb)} transitions to {args.save_buffer}")
    envs.close()


if __name__ == "__main__":
    main()
