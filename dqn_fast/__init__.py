"""dqn_fast: fast, lean experience replay and a DQN trainer."""

from .replay import Batch, ReplayBuffer

__all__ = ["Batch", "ReplayBuffer"]
__version__ = "0.1.0"
