"""The learner's pieces against hand computations."""

import numpy as np
import pytest
import torch

from dqn_fast.agent import DQNAgent, LearnerConfig, linear_epsilon, td_targets
from dqn_fast.networks import MLP, Dueling, NatureCNN, q_network


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


def test_dueling_heads_have_two_streams_and_q_is_v_plus_a_minus_mean_a():
    torch.manual_seed(0)
    mlp = q_network((3,), 4, hidden=(8, 6), dueling=True)
    head = mlp.net[-1]
    assert isinstance(head, Dueling)
    assert (head.value.in_features, head.value.out_features) == (6, 1)
    assert (head.advantage.in_features, head.advantage.out_features) == (6, 4)
    x = torch.randn(5, 3)
    h = mlp.net[:-1](x)
    v, a = head.value(h), head.advantage(h)
    q = mlp(x)
    assert q.shape == (5, 4)
    torch.testing.assert_close(q, v + a - a.mean(dim=1, keepdim=True))
    torch.testing.assert_close(q.mean(dim=1), v.squeeze(1))  # the mean over actions is V
    assert torch.equal(q.argmax(1), a.argmax(1))  # A ranks the actions

    cnn = q_network((4, 84, 84), 6, dueling=True)
    assert isinstance(cnn.head, Dueling)
    for stream, out in ((cnn.head.value, 1), (cnn.head.advantage, 6)):
        assert [(m.in_features, m.out_features) for m in stream if isinstance(m, torch.nn.Linear)] == [(3136, 512), (512, out)]
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    h = cnn.features(frames.float() / 255.0)
    v, a = cnn.head.value(h), cnn.head.advantage(h)
    torch.testing.assert_close(cnn(frames), v + a - a.mean(dim=1, keepdim=True))
    # a plain head has no value stream: one linear layer per action
    assert not any(isinstance(m, Dueling) for m in q_network((3,), 4).modules())


def test_the_agent_builds_a_dueling_net_and_its_target_copy():
    agent = DQNAgent((3,), 2, LearnerConfig(), "cpu", hidden=(4,), dueling=True)
    assert isinstance(agent.online.net[-1], Dueling) and isinstance(agent.target.net[-1], Dueling)
    agent.update(**tiny_batch())  # trains like any other head


def by_hand(agent, b, discount, weights, loss="mse", double=False):
    """Loss and |TD error| of the agent's current nets, written out."""
    with torch.no_grad():
        q = agent.online(b["obs"])[torch.arange(5), b["action"]]
        next_q = agent.target(b["next_obs"])
        if double:
            next_v = next_q[torch.arange(5), agent.online(b["next_obs"]).argmax(1)]
        else:
            next_v = next_q.max(1).values
        y = b["reward"] + discount * (~b["terminated"]).float() * next_v
        err = q - y
        per = err**2 if loss == "mse" else torch.where(err.abs() < 1, 0.5 * err**2, err.abs() - 0.5)
        return (weights * per).mean(), err.abs()


@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("double", [False, True])
def test_weighted_loss_discount_and_td_errors_equal_the_hand_computation(loss, double):
    agent = DQNAgent((3,), 2, LearnerConfig(loss=loss, double_dqn=double, max_grad_norm=0.0, lr=0.05, target_update_interval=10**9), "cpu", hidden=(4,))
    b = tiny_batch()
    b["reward"] = b["reward"] * 3  # errors on both sides of Huber's kink
    weights = torch.tensor([1.0, 0.25, 0.5, 0.1, 0.75])
    discount = torch.tensor([0.5, 0.9, 0.0, 0.729, 0.99])  # gamma**m per row; 0 cuts the bootstrap
    expected_loss, expected_td = by_hand(agent, b, discount, weights, loss, double)
    unweighted, _ = by_hand(agent, b, discount, torch.ones(5), loss, double)
    assert not torch.allclose(unweighted, expected_loss)  # the weights matter on this batch
    with torch.no_grad():
        q2 = agent.online(b["obs"])[2, b["action"][2]]
    got_loss, got_td = agent.train_step(**b, weights=weights, discount=discount)
    torch.testing.assert_close(got_loss, expected_loss)
    torch.testing.assert_close(got_td, expected_td)
    assert got_td.shape == (5,) and not got_td.requires_grad
    # row 2 has discount 0: its target is its reward, whatever the next state
    torch.testing.assert_close(got_td[2], (q2 - b["reward"][2]).abs())


def test_discount_replaces_gamma_in_the_target():
    b = tiny_batch()
    gamma = 0.99
    agent = tiny_agent(target_update_interval=10**9)
    initial = agent.state_dict()
    initial = {"online": {k: v.clone() for k, v in initial["online"].items()}, "target": {k: v.clone() for k, v in initial["target"].items()}}
    with torch.no_grad():
        next_max = agent.target(b["next_obs"]).max(1).values
        q = agent.online(b["obs"])[torch.arange(5), b["action"]]
    # gamma**3 on every row: the n = 3 target, not the one-step one
    discount = torch.full((5,), gamma**3)
    _, td = agent.train_step(**b, discount=discount)
    live = ~b["terminated"]
    y3 = b["reward"] + gamma**3 * live.float() * next_max
    y1 = b["reward"] + gamma * live.float() * next_max
    torch.testing.assert_close(td, (q - y3).abs())
    assert not torch.allclose(td[live], (q - y1).abs()[live])
    # and without a discount the target uses gamma, as before
    fresh = tiny_agent(target_update_interval=10**9)
    fresh.online.load_state_dict(initial["online"])
    fresh.target.load_state_dict(initial["target"])
    _, td1 = fresh.train_step(**b)
    torch.testing.assert_close(td1, (q - y1).abs())


def test_update_with_all_one_weights_equals_the_unweighted_update():
    a, b = tiny_agent(), tiny_agent()
    b.online.load_state_dict(a.online.state_dict())
    b.target.load_state_dict(a.target.state_dict())
    batch = tiny_batch()
    torch.testing.assert_close(a.update(**batch), b.update(**batch, weights=torch.ones(5)))
    assert all(torch.equal(x, y) for x, y in zip(a.online.parameters(), b.online.parameters()))
