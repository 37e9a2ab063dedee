"""Q-networks: the Nature DQN CNN for frames, an MLP for vector observations."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class NatureCNN(nn.Module):
    """Mnih et al. (2015): 32x8x8/4, 64x4x4/2, 64x3x3/1, 512, one Q per action.

    Takes uint8 frames (B, k, 84, 84) and scales them to [0, 1] on the device,
    so frames travel to the GPU as bytes, not floats.
    """

    def __init__(self, in_channels: int, n_actions: int, frame_size: int = 84):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, in_channels, frame_size, frame_size)).shape[1]
        self.head = nn.Sequential(nn.Linear(n_flat, 512), nn.ReLU(), nn.Linear(512, n_actions))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(frames.float() / 255.0))


class MLP(nn.Module):
    """Vector observations; one hidden layer of 128 by default, as in the classic tutorial."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int] = (128,)):
        super().__init__()
        layers, last = [], obs_dim
        for width in hidden:
            layers += [nn.Linear(last, width), nn.ReLU()]
            last = width
        layers.append(nn.Linear(last, n_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float())


def q_network(obs_shape: Sequence[int], n_actions: int, hidden: Sequence[int] = (128,)) -> nn.Module:
    """The CNN for (k, H, W) frame stacks, the MLP for flat vectors."""
    if len(obs_shape) == 3:
        return NatureCNN(obs_shape[0], n_actions, frame_size=obs_shape[-1])
    if len(obs_shape) == 1:
        return MLP(obs_shape[0], n_actions, hidden)
    raise ValueError(f"no Q-network for observations of shape {tuple(obs_shape)}: expected (k, H, W) or (n,)")
