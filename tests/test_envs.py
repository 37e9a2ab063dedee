"""Envs: autoreset handling, Atari ids, errors that say what to do."""

import numpy as np
import pytest

from dqn_fast.envs import EnvError, atari_game, final_observations, make_env


def test_final_observations_replace_only_the_envs_that_ended():
    obs = np.arange(12, dtype=np.float32).reshape(3, 4)  # reset obs for env 1
    final = np.empty(3, dtype=object)
    final[1] = np.full(4, -1.0, np.float32)
    info = {"final_obs": final, "_final_obs": np.array([False, True, False])}
    done = np.array([False, True, False])
    got = final_observations(obs, done, info)
    assert np.array_equal(got[1], final[1]) and np.array_equal(got[[0, 2]], obs[[0, 2]])
    assert np.array_equal(obs[1], np.arange(4, 8))  # the obs to act on keeps the reset obs
    with pytest.raises(RuntimeError, match="SAME_STEP"):
        final_observations(obs, done, {})


def test_every_step_is_a_transition_and_episode_ends_keep_their_final_obs():
    envs = make_env("CartPole-v1", num_envs=3)
    rng = np.random.default_rng(0)
    envs.reset(seed=0)
    ended = 0
    for _ in range(300):
        step = envs.step(rng.integers(0, 2, size=3))
        done = step.terminated | step.truncated
        for e in range(3):
            if done[e]:
                ended += 1
                x, theta = step.next_obs[e][0], step.next_obs[e][2]
                # the stored next_obs is the final state (out of bounds), not the reset state
                assert step.truncated[e] or abs(x) > 2.4 or abs(theta) > 0.2095
                assert abs(step.obs[e]).max() <= 0.05  # the obs to act on is a fresh reset
            else:
                assert np.array_equal(step.next_obs[e], step.obs[e])
    assert ended > 10
    assert np.array_equal(step.game_over, step.terminated | step.truncated)
    envs.close()


def test_atari_ids_map_to_ale_rom_names():
    assert atari_game("ALE/Pong-v5") == "pong"
    assert atari_game("BreakoutNoFrameskip-v4") == "breakout"
    assert atari_game("ALE/MsPacman-v5") == "ms_pacman"
    assert atari_game("SpaceInvadersNoFrameskip-v4") == "space_invaders"


def test_atari_training_envs_end_episodes_on_life_loss_but_games_on_game_over():
    envs = make_env("ALE/Breakout-v5", num_envs=2, training=True)
    assert envs.obs_shape == (4, 84, 84) and envs.obs_dtype == np.uint8 and envs.frame_stack == 4
    obs = envs.reset(seed=1)
    rng = np.random.default_rng(1)
    lives_lost = games = 0
    for _ in range(3000):
        step = envs.step(rng.integers(0, envs.n_actions, size=2))
        life_lost = step.terminated & ~step.game_over
        lives_lost += int(life_lost.sum())
        games += int(step.game_over.sum())
        # Every transition, life losses and game overs included, is obs
        # shifted by one frame: the stored next_obs is the true next obs.
        assert (step.next_obs[:, :3] == obs[:, 1:]).all()
        # After a lost life the game goes on: the next obs continues the stream.
        assert (step.obs[life_lost] == step.next_obs[life_lost]).all()
        obs = step.obs
        if games >= 1:
            break
    assert games >= 1 and lives_lost >= 4  # Breakout: 5 lives per game
    envs.close()


def test_unknown_or_unsuitable_envs_get_a_clear_error():
    with pytest.raises(EnvError, match="unknown env id 'NoSuchEnv-v0'"):
        make_env("NoSuchEnv-v0")
    with pytest.raises(EnvError, match="no ROM named 'no_such_game'"):
        make_env("ALE/NoSuchGame-v5")
    with pytest.raises(EnvError, match="discrete action space"):
        make_env("Pendulum-v1")
