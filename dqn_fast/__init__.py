"""dqn_fast: fast, lean experience replay and a DQN trainer."""

from .replay import Batch, ReplayBuffer, ReplayFileError

__all__ = ["Batch", "ReplayBuffer", "ReplayFileError"]
__version__ = "0.1.0"
