"""The DQN learner: online and target Q-networks, TD targets, loss, target sync.

Conventions (checked in tests/test_agent.py):
* terminated transitions do not bootstrap; truncated ones do (a time limit is
  not a terminal state of the MDP);
* the target network is frozen and only changes in `sync_target`, which runs
  every `target_update_interval` learner updates: a hard copy when tau == 1,
  Polyak averaging target <- tau * online + (1 - tau) * target otherwise;
* double DQN picks the next action with the online net and values it with
  the target net (van Hasselt et al., 2016);
* n-step returns: the batch's reward is the discounted sum over the window
  and its `discount` is gamma**m for the window's length m, so the target is
  reward + discount * (1 - terminated) * V_target(next_obs), per sample;
* prioritized replay: each sample's loss is scaled by its importance weight
  and the loss is the mean of the scaled losses (Schaul et al., 2016); the new
  priority is |TD error| of the online net before the gradient step, without
  priority_eps (the buffer adds it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .networks import q_network


@dataclass
class LearnerConfig:
    gamma: float = 0.99
    lr: float = 1e-4
    optimizer: str = "adam"  # "adam" | "rmsprop" (Nature DQN)
    loss: str = "huber"  # "huber" | "mse"
    double_dqn: bool = False
    max_grad_norm: float = 10.0  # 0 disables clipping
    target_update_interval: int = 1000  # learner updates between target syncs
    tau: float = 1.0  # 1: hard copy; < 1: Polyak averaging at each sync


def linear_epsilon(step: int, start: float, end: float, duration: int) -> float:
    """Linear decay from start to end over `duration` steps, then constant."""
    if duration <= 0:
        return end
    return start + (end - start) * min(1.0, step / duration)


def td_targets(reward, terminated, next_q_target, gamma, next_q_online=None):
    """r + gamma * max_a' Q_target(s', a') for non-terminal s' (double DQN:
    Q_target(s', argmax_a' Q_online(s', a'))). gamma is a float or a (B,)
    tensor of per-sample discounts (n-step: gamma**m)."""
    if next_q_online is None:
        next_value = next_q_target.max(dim=1).values
    else:
        next_value = next_q_target.gather(1, next_q_online.argmax(dim=1, keepdim=True)).squeeze(1)
    return reward + gamma * (1.0 - terminated.float()) * next_value


def make_optimizer(params, cfg: LearnerConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        try:  # one fused kernel per step instead of a loop over tensors
            return torch.optim.Adam(params, lr=cfg.lr, fused=True)
        except (RuntimeError, TypeError):  # pragma: no cover - older torch / unsupported device
            return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "rmsprop":
        # Nature DQN: squared-gradient momentum 0.95, min squared gradient 0.01.
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.95, eps=0.01, centered=True)
    raise ValueError(f"optimizer must be 'adam' or 'rmsprop', got {cfg.optimizer!r}")


class DQNAgent:
    def __init__(
        self,
        obs_shape: Sequence[int],
        n_actions: int,
        cfg: LearnerConfig,
        device: torch.device | str = "cpu",
        hidden: Sequence[int] = (128,),
        dueling: bool = False,
    ):
        if cfg.loss not in ("huber", "mse"):
            raise ValueError(f"loss must be 'huber' or 'mse', got {cfg.loss!r}")
        if not 0.0 < cfg.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {cfg.tau}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.n_actions = n_actions
        self.online = q_network(obs_shape, n_actions, hidden, dueling).to(self.device)
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)
        # Listed once: walking the modules for them costs ~50 us per update on a small net.
        self._online_params = list(self.online.parameters())
        self._target_params = list(self.target.parameters())
        self.optimizer = make_optimizer(self._online_params, cfg)
        self.updates = 0

    @torch.no_grad()
    def act(self, obs: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
        """Epsilon-greedy actions for a batch of observations, one forward pass."""
        n = len(obs)
        explore = rng.random(n) < epsilon
        actions = rng.integers(0, self.n_actions, size=n)
        if not explore.all():
            q = self.online(torch.as_tensor(obs, device=self.device))
            greedy = q.argmax(dim=1).cpu().numpy()
            actions = np.where(explore, actions, greedy)
        return actions.astype(np.int64)

    def update(self, obs, action, reward, next_obs, terminated, weights=None, discount=None) -> torch.Tensor:
        """One gradient step on a batch of device tensors; returns the loss (no host sync)."""
        return self.train_step(obs, action, reward, next_obs, terminated, weights, discount)[0]

    def train_step(self, obs, action, reward, next_obs, terminated, weights=None, discount=None):
        """One gradient step; returns (loss, |TD error| per sample), both on the
        device, detached, with no host sync. weights: (B,) importance weights
        (None: all 1); discount: (B,) bootstrap discounts (None: gamma)."""
        q = self.online(obs).gather(1, action.long().view(-1, 1)).squeeze(1)
        with torch.no_grad():
            next_q_online = self.online(next_obs) if self.cfg.double_dqn else None
            gamma = self.cfg.gamma if discount is None else discount
            target = td_targets(reward, terminated, self.target(next_obs), gamma, next_q_online)
        per_sample = (F.smooth_l1_loss if self.cfg.loss == "huber" else F.mse_loss)(q, target, reduction="none")
        loss = per_sample.mean() if weights is None else (weights * per_sample).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self._online_params, self.cfg.max_grad_norm, foreach=self.device.type in ("cpu", "cuda"))
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.cfg.target_update_interval == 0:
            self.sync_target()
        return loss.detach(), (q.detach() - target).abs()

    @torch.no_grad()
    def sync_target(self) -> None:
        if self.cfg.tau >= 1.0:
            self.target.load_state_dict(self.online.state_dict())
        else:  # one foreach kernel: a per-tensor loop costs ~5x more on small nets, every update
            torch._foreach_lerp_(self._target_params, self._online_params, self.cfg.tau)

    def state_dict(self) -> dict:
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
