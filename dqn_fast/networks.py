"""Q-networks: the Nature DQN CNN for frames, an MLP for vector observations,
each with a plain or a dueling head (Wang et al., 2016)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Dueling(nn.Module):
    """Q(s, a) = V(s) + A(s, a) - mean_a' A(s, a') (Wang et al. 2016, eq. 9).

    Subtracting the mean advantage makes V and A identifiable (the mean of Q
    over actions is V) while keeping the action ranking of A.
    """

    def __init__(self, value: nn.Module, advantage: nn.Module):
        super().__init__()
        self.value = value  # features -> (B, 1)
        self.advantage = advantage  # features -> (B, n_actions)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.advantage(h)
        return self.value(h) + a - a.mean(dim=1, keepdim=True)


class NatureCNN(nn.Module):
    """Mnih et al. (2015): 32x8x8/4, 64x4x4/2, 64x3x3/1, 512, one Q per action.

    Takes uint8 frames (B, k, 84, 84) and scales them to [0, 1] on the device,
    so frames travel to the GPU as bytes, not floats. Dueling: a value and an
    advantage stream of 512 units each on the shared conv features, as in the
    dueling paper.
    """

    def __init__(self, in_channels: int, n_actions: int, frame_size: int = 84, dueling: bool = False):
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

        def stream(out: int) -> nn.Module:
            return nn.Sequential(nn.Linear(n_flat, 512), nn.ReLU(), nn.Linear(512, out))

        self.head = Dueling(stream(1), stream(n_actions)) if dueling else stream(n_actions)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(frames.float() / 255.0))


class MLP(nn.Module):
    """Vector observations; one hidden layer of 128 by default, as in the classic
    tutorial. Dueling: the hidden layers are shared, then one linear layer each
    for V and A."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int] = (128,), dueling: bool = False):
        super().__init__()
        layers, last = [], obs_dim
        for width in hidden:
            layers += [nn.Linear(last, width), nn.ReLU()]
            last = width
        if dueling:
            self.net = nn.Sequential(*layers, Dueling(nn.Linear(last, 1), nn.Linear(last, n_actions)))
        else:
            self.net = nn.Sequential(*layers, nn.Linear(last, n_actions))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float())


def q_network(obs_shape: Sequence[int], n_actions: int, hidden: Sequence[int] = (128,), dueling: bool = False) -> nn.Module:
    """The CNN for (k, H, W) frame stacks, the MLP for flat vectors."""
    if len(obs_shape) == 3:
        return NatureCNN(obs_shape[0], n_actions, frame_size=obs_shape[-1], dueling=dueling)
    if len(obs_shape) == 1:
        return MLP(obs_shape[0], n_actions, hidden, dueling=dueling)
    raise ValueError(f"no Q-network for observations of shape {tuple(obs_shape)}: expected (k, H, W) or (n,)")
