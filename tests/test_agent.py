"""The learner's pieces against hand computations."""

import numpy as np
import pytest
import torch

from dqn_fast.agent import DQNAgent, LearnerConfig, linear_epsilon, td_targets
from dqn_fast.networks import MLP, NatureCNN, q_network


def test_td_targets_by_hand_terminated_does_not_bootstrap_truncated_does():
    reward = torch.tensor([1.0, 0.5, -1.0, 2.0])
    terminated = torch.tensor([False, True, False, True])
    # truncated rows (2) bootstrap like any non-terminal row
    next_q = torch.tensor([[1.0, 3.0], [10.0, 20.0], [4.0, -2.0], [5.0, 5.0]])
    got = td_targets(reward, terminated, next_q, gamma=0.9)
    expected = torch.tensor([1.0 + 0.9 * 3.0, 0.5, -1.0 + 0.9 * 4.0, 2.0])
    torch.testing.assert_close(got, expected)


def test_double_dqn_targets_value_the_online_argmax_with_the_target_net():
    reward = torch.tensor([0.0, 1.0])
    terminated = torch.tensor([False, False])
    next_q_target = torch.tensor([[1.0, 3.0, 2.0], [7.0, 0.0, 1.0]])
    next_q_online = torch.tensor([[0.0, 0.0, 9.0], [0.0, 5.0, 0.0]])  # picks actions 2 and 1
    got = td_targets(reward, terminated, next_q_target, 0.5, next_q_online)
    torch.testing.assert_close(got, torch.tensor([0.5 * 2.0, 1.0 + 0.5 * 0.0]))


def tiny_agent(**kw):
    cfg = LearnerConfig(lr=0.05, loss="mse", max_grad_norm=0.0, **kw)
    return DQNAgent((3,), 2, cfg, "cpu", hidden=(4,))


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(5, 3, generator=g)
    return dict(
        obs=obs,
        action=torch.tensor([0, 1, 1, 0, 1]),
        reward=torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0]),
        next_obs=torch.randn(5, 3, generator=g),
        terminated=torch.tensor([False, True, False, False, True]),
    )


def test_update_minimises_the_loss_computed_by_hand():
    agent = tiny_agent(target_update_interval=10**9)
    b = tiny_batch()
    with torch.no_grad():
        q = agent.online(b["obs"])[torch.arange(5), b["action"]]
        next_max = agent.target(b["next_obs"]).max(1).values
        y = b["reward"] + 0.99 * (~b["terminated"]).float() * next_max
        expected = ((q - y) ** 2).mean()
    loss = agent.update(**b)
    torch.testing.assert_close(loss, expected)
    assert agent.update(**b) < loss  # one step downhill on the same batch


def test_huber_loss_is_used_when_asked():
    agent = DQNAgent((3,), 2, LearnerConfig(loss="huber", max_grad_norm=0.0, lr=0.0), "cpu", hidden=(4,))
    b = tiny_batch()
    b["reward"] = b["reward"] * 100  # errors far beyond 1: Huber is linear there
    with torch.no_grad():
        q = agent.online(b["obs"])[torch.arange(5), b["action"]]
        y = b["reward"] + 0.99 * (~b["terminated"]).float() * agent.target(b["next_obs"]).max(1).values
        err = (q - y).abs()
        expected = torch.where(err < 1, 0.5 * err**2, err - 0.5).mean()
    torch.testing.assert_close(agent.update(**b), expected)


def test_target_network_is_frozen_and_hard_synced_every_c_updates():
    agent = tiny_agent(target_update_interval=3, tau=1.0)
    assert all(not p.requires_grad for p in agent.target.parameters())
    b = tiny_batch()
    start = [p.clone() for p in agent.target.parameters()]
    for n in range(1, 7):
        agent.update(**b)
        same_as_online = all(torch.equal(t, o) for t, o in zip(agent.target.parameters(), agent.online.parameters()))
        unchanged = all(torch.equal(t, s) for t, s in zip(agent.target.parameters(), start))
        if n % 3 == 0:
            assert same_as_online, f"target must equal online right after update {n}"
            start = [p.clone() for p in agent.target.parameters()]
        else:
            assert unchanged and not same_as_online, f"target must not move at update {n}"


def test_polyak_sync_moves_the_target_by_tau():
    agent = tiny_agent(target_update_interval=1, tau=0.25)
    before = [p.clone() for p in agent.target.parameters()]
    agent.update(**tiny_batch())
    for t, o, b in zip(agent.target.parameters(), agent.online.parameters(), before):
        torch.testing.assert_close(t, b + 0.25 * (o - b))


def test_linear_epsilon_schedule():
    assert linear_epsilon(0, 1.0, 0.01, 100) == 1.0
    assert linear_epsilon(50, 1.0, 0.01, 100) == pytest.approx(0.505)
    assert linear_epsilon(100, 1.0, 0.01, 100) == pytest.approx(0.01)
    assert linear_epsilon(10**6, 1.0, 0.01, 100) == pytest.approx(0.01)
    assert linear_epsilon(5, 1.0, 0.1, 0) == 0.1


def test_act_is_greedy_at_epsilon_zero_and_uniform_at_one():
    agent = tiny_agent()
    obs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    greedy = agent.online(torch.from_numpy(obs)).argmax(1).numpy()
    assert np.array_equal(agent.act(obs, 0.0, np.random.default_rng(1)), greedy)
    random_actions = np.concatenate([agent.act(obs, 1.0, np.random.default_rng(s)) for s in range(20)])
    assert 0.4 < random_actions.mean() < 0.6


def test_networks_have_the_published_shapes():
    cnn = q_network((4, 84, 84), 6)
    assert isinstance(cnn, NatureCNN)
    convs = [m for m in cnn.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(32, (8, 8), (4, 4)), (64, (4, 4), (2, 2)), (64, (3, 3), (1, 1))]
    assert cnn.head[0].in_features == 3136 and cnn.head[0].out_features == 512
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    assert cnn(frames).shape == (2, 6)
    torch.testing.assert_close(cnn(frames), cnn(frames.float()))  # scaling happens inside, from bytes
    mlp = q_network((4,), 2)
    assert isinstance(mlp, MLP) and [m.out_features for m in mlp.net if isinstance(m, torch.nn.Linear)] == [128, 2]
    with pytest.raises(ValueError, match="no Q-network"):
        q_network((2, 3), 2)
