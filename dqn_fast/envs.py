"""Environments: Atari through ale-py's native vector env, classic control
through gymnasium's vector envs, behind one small interface.

Every env here autoresets in the *same* step (gymnasium's SAME_STEP mode):
the step that ends an episode returns the next episode's first obs, and the
ended episode's true final obs in ``info["final_obs"]``. So every step of
every env is a real transition (no reset-only steps to filter out), and
``VecEnv.step`` hands the trainer the obs to store as next_obs separately
from the obs to act on.

Atari preprocessing (Mnih et al. 2015, Machado et al. 2018 defaults where
they differ): up to 30 no-op actions at reset, frame skip 4 with a max-pool
over the last two frames, 84x84 grayscale, a stack of 4 frames, FIRE on
reset where the game needs it, no sticky actions. For training, losing a
life ends the episode (the game itself goes on) and the trainer clips
rewards to their sign; evaluation plays full games with raw scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


class EnvError(ValueError):
    """An env that cannot be made, with a message that says what to do."""


@dataclass
class StepResult:
    obs: np.ndarray  # what to act on next (reset obs where the env was reset)
    next_obs: np.ndarray  # what to store as next_obs (true final obs where it was reset)
    reward: np.ndarray  # raw env reward
    terminated: np.ndarray
    truncated: np.ndarray
    game_over: np.ndarray  # a whole game ended (Atari: not just a life)


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/") or "NoFrameskip" in env_id


def atari_game(env_id: str) -> str:
    """'ALE/MsPacman-v5' or 'MsPacmanNoFrameskip-v4' -> 'ms_pacman' (ale-py's ROM name)."""
    name = env_id.split("/", 1)[-1]
    name = re.sub(r"-v\d+$", "", name).replace("NoFrameskip", "").replace("Deterministic", "")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def final_observations(obs: np.ndarray, done: np.ndarray, info: dict) -> np.ndarray:
    """next_obs to store for a SAME_STEP autoreset step: obs, except the true
    final obs for the envs whose episode ended in this step."""
    if not done.any():
        return obs
    if "final_obs" not in info:
        raise RuntimeError("an episode ended but the env gave no info['final_obs']: it must use SAME_STEP autoreset")
    final, mask = info["final_obs"], info.get("_final_obs", done)
    next_obs = obs.copy()
    for e in np.flatnonzero(done):
        if not mask[e]:
            raise RuntimeError(f"env {e} ended without a final observation")
        next_obs[e] = final[e]
    return next_obs


class VecEnv:
    """num_envs envs stepped in lockstep; see the module docstring."""

    def __init__(self, env, atari: bool, env_id: str):
        self.env = env
        self.atari = atari
        self.env_id = env_id
        self.num_envs = env.num_envs
        space = env.single_observation_space
        self.obs_shape: Tuple[int, ...] = tuple(space.shape)
        self.obs_dtype = np.dtype(space.dtype)
        self.frame_stack = self.obs_shape[0] if atari else 1
        self.n_actions = int(env.single_action_space.n)
        self._lives: Optional[np.ndarray] = None

    def reset(self, seed: Optional[int] = None) -> np.ndarray:
        obs, info = self.env.reset(seed=seed)
        self._lives = np.asarray(info["lives"]).copy() if "lives" in info else None
        return obs

    def step(self, actions: np.ndarray) -> StepResult:
        obs, reward, terminated, truncated, info = self.env.step(actions)
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        game_over = terminated | truncated
        if self._lives is not None and "lives" in info:
            # A life lost ends a training episode but not the game: ale-py
            # does not reset that env, the obs it returns is the true next
            # obs, and its info["final_obs"] row is stale. The game is over
            # (and the env reset) when lives go back up, or for games
            # without lives.
            lives = np.asarray(info["lives"])
            game_over = truncated | (terminated & (lives >= self._lives))
            self._lives = lives.copy()
        next_obs = final_observations(obs, game_over, info)
        return StepResult(obs, next_obs, np.asarray(reward, np.float64), terminated, truncated, game_over)

    def close(self) -> None:
        self.env.close()


def make_env(env_id: str, num_envs: int = 1, seed: Optional[int] = None, training: bool = True) -> VecEnv:
    """A VecEnv for an Atari game (ale-py) or a gymnasium env id such as CartPole-v1."""
    if num_envs < 1:
        raise EnvError(f"num_envs must be at least 1, got {num_envs}")
    try:
        import gymnasium as gym
        from gymnasium.vector import AutoresetMode
    except ImportError:
        raise EnvError("gymnasium is not installed: pip install 'dqn-fast[train]'") from None
    if is_atari(env_id):
        try:
            from ale_py import roms
            from ale_py.vector_env import AtariVectorEnv
        except ImportError:
            raise EnvError(f"{env_id} needs ale-py: pip install 'dqn-fast[atari]'") from None
        game = atari_game(env_id)
        if roms.get_rom_path(game) is None:
            raise EnvError(f"unknown Atari game {env_id!r} (ale-py has no ROM named {game!r})")
        env = AtariVectorEnv(
            game,
            num_envs,
            autoreset_mode=AutoresetMode.SAME_STEP,
            noop_max=30,
            frameskip=4,
            maxpool=True,
            img_height=84,
            img_width=84,
            grayscale=True,
            stack_num=4,
            use_fire_reset=True,
            repeat_action_probability=0.0,
            life_loss_info=training,
            episodic_life=False,
            reward_clipping=False,  # the trainer clips; raw scores stay visible
        )
        return VecEnv(env, atari=True, env_id=env_id)
    try:
        gym.spec(env_id)
    except gym.error.Error:
        raise EnvError(f"unknown env id {env_id!r}: use a gymnasium id such as CartPole-v1 or an Atari id such as ALE/Pong-v5") from None
    env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync", vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})
    if not isinstance(env.single_action_space, gym.spaces.Discrete):
        env.close()
        raise EnvError(f"DQN needs a discrete action space; {env_id} has {env.single_action_space}")
    if len(env.single_observation_space.shape) != 1:
        env.close()
        raise EnvError(f"{env_id} has observations of shape {env.single_observation_space.shape}; only vectors or Atari frames are supported")
    return VecEnv(env, atari=False, env_id=env_id)
