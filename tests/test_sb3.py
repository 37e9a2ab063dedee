"""dqn_fast.sb3.ReplayBuffer inside Stable-Baselines3, against SB3's own buffer."""

import copy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
torch = pytest.importorskip("torch")
ale_py = pytest.importorskip("ale_py")

import gymnasium as gym  # noqa: E402
from gymnasium import spaces  # noqa: E402
from stable_baselines3 import DQN, SAC  # noqa: E402
from stable_baselines3.common.buffers import ReplayBuffer as SB3Buffer  # noqa: E402
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold  # noqa: E402
from stable_baselines3.common.env_util import make_atari_env, make_vec_env  # noqa: E402
from stable_baselines3.common.vec_env import VecFrameStack, VecNormalize  # noqa: E402

import dqn_fast  # noqa: E402
from dqn_fast import sb3  # noqa: E402

gym.register_envs(ale_py)  # Atari ids (ROMs ship with ale-py)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tee(SB3Buffer):
    """SB3's own buffer, fed by SB3's real collection loop, that also feeds ours."""

    ours_kwargs: dict = {}

    def __init__(self, buffer_size, observation_space, action_space, device="auto", n_envs=1, **kwargs):
        super().__init__(buffer_size, observation_space, action_space, device, n_envs, **kwargs)
        self.ours = sb3.ReplayBuffer(
            buffer_size, observation_space, action_space, device, n_envs, **{**kwargs, **self.ours_kwargs}
        )

    def add(self, *args):
        super().add(*args)
        self.ours.add(*args)


def key(obs, action, next_obs, done, reward):
    return obs.tobytes(), np.asarray(action).tobytes(), next_obs.tobytes(), float(done), float(reward)


def sb3_contents(rb: SB3Buffer) -> Counter:
    rows = rb.buffer_size if rb.full else rb.pos
    return Counter(
        key(rb.observations[r, e], rb.actions[r, e], rb.next_observations[r, e],
            rb.dones[r, e] * (1 - rb.timeouts[r, e]), rb.rewards[r, e])
        for r in range(rows)
        for e in range(rb.n_envs)
    )


def sampled_contents(rb, draws: int) -> set:
    out = set()
    for _ in range(0, draws, 256):
        obs, act, nxt, done, rew = (x.numpy() for x in rb.sample(256)[:5])
        out.update(key(obs[i], act[i], nxt[i], done[i, 0], rew[i, 0]) for i in range(256))
    return out


def collect(env, steps, buffer_size, ours_kwargs, **buffer_kwargs):
    """Random-action transitions from SB3's own DQN loop into both buffers."""
    Tee.ours_kwargs = ours_kwargs
    model = DQN("MlpPolicy" if len(env.observation_space.shape) == 1 else "CnnPolicy", env, buffer_size=buffer_size,
                learning_starts=10**9, replay_buffer_class=Tee, replay_buffer_kwargs=buffer_kwargs, seed=0,
                device="cpu")  # samples are compared as numpy arrays, also on a GPU machine
    model.learn(steps)
    return model.replay_buffer


@pytest.mark.parametrize(
    "sb3_kwargs,ours_kwargs",
    [
        (dict(handle_timeout_termination=True), {}),
        (dict(handle_timeout_termination=False), {}),
        # SB3 forbids this combination (SB3 issue #934); here it must equal SB3's correct layout.
        (dict(handle_timeout_termination=True), dict(optimize_memory_usage=True)),
    ],
    ids=["timeouts", "no-timeouts", "optimize-memory+timeouts"],
)
@pytest.mark.parametrize("buffer_size", [10_000, 300], ids=["fill", "wrap"])
def test_same_stream_same_transitions_cartpole(sb3_kwargs, ours_kwargs, buffer_size):
    # Time limits of 20 steps: truncations and terminations both happen.
    env = make_vec_env("CartPole-v1", n_envs=2, seed=1, env_kwargs=dict(max_episode_steps=20))
    # CartPole's random episodes average ~20 steps, below what the default
    # frame reserve covers; a larger one keeps exactly the newest 300.
    rb = collect(env, 800, buffer_size, dict(ours_kwargs, frame_reserve=1.0), **sb3_kwargs)
    truncated = (rb.timeouts * rb.dones).sum() if sb3_kwargs["handle_timeout_termination"] else 1
    assert truncated > 0 and (rb.dones * (1 - rb.timeouts)).sum() > 0
    assert (rb.ours.pos, rb.ours.full, rb.ours.size()) == (rb.pos, rb.full, rb.size())
    want = sb3_contents(rb)
    got = sampled_contents(rb.ours, 25 * sum(want.values()))
    assert got == set(want)


def test_same_stream_same_transitions_atari_frame_stack():
    # Real Pong frames through SB3's Atari wrappers, VecFrameStack and (DQN's)
    # VecTransposeImage, with time limits so stacks restart mid-run.
    env = VecFrameStack(make_atari_env("PongNoFrameskip-v4", n_envs=2, seed=0,
                                       env_kwargs=dict(max_episode_steps=150)), 4)
    rb = collect(env, 300, 10_000, dict(optimize_memory_usage=True))
    assert (rb.ours.frame_stack, rb.ours.stack_axis, rb.observation_space.shape) == (4, 0, (4, 84, 84))
    assert (rb.timeouts * rb.dones).sum() > 0
    want = sb3_contents(rb)
    assert sampled_contents(rb.ours, 20 * sum(want.values())) == set(want)
    # One frame per step (plus episode starts) instead of SB3's 8.
    assert rb.ours.native.frames_written < 1.2 * rb.ours.native.total_adds


def test_frame_stack_detection_and_keywords():
    def layout(shape, **kw):
        rb = sb3.ReplayBuffer(100, spaces.Box(0, 255, shape, np.uint8), spaces.Discrete(4), "cpu", **kw)
        return rb.frame_stack, rb.stack_axis, rb.native.obs_shape

    assert layout((4, 84, 84)) == (4, 0, (4, 84, 84))  # VecFrameStack + VecTransposeImage
    assert layout((84, 84, 4)) == (4, -1, (84, 84, 4))  # VecFrameStack, channel-last
    assert layout((3, 64, 64)) == (1, 0, (3, 64, 64))  # one RGB frame
    assert layout((84, 84, 1)) == (1, -1, (84, 84, 1))
    assert layout((12, 64, 64), frame_stack=4) == (4, 0, (4, 3, 64, 64))  # 4 stacked RGB frames
    vec = sb3.ReplayBuffer(100, spaces.Box(-1, 1, (12,), np.float32), spaces.Discrete(2), "cpu", frame_stack=3)
    assert (vec.frame_stack, vec.native.obs_shape) == (3, (3, 4))  # VecFrameStack on vectors
    with pytest.raises(ValueError, match="channel-last stacks of 3-channel frames"):
        layout((64, 64, 12), frame_stack=4)
    with pytest.raises(ValueError, match="does not divide"):
        layout((4, 84, 84), frame_stack=3)


def test_sb3_dqn_cartpole_same_quality_as_sb3_buffer():
    # SB3 RL Zoo's CartPole DQN settings (smaller net). Both buffers must
    # reach a mean evaluation return of 200 (5 episodes, every 2,000 steps)
    # within 30k steps on the same seeds; training stops when they do.
    def steps_to_solve(buffer_class, seed):
        model = DQN("MlpPolicy", "CartPole-v1", learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
                    learning_starts=1000, target_update_interval=10, train_freq=256, gradient_steps=128,
                    exploration_fraction=0.16, exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[64, 64]),
                    replay_buffer_class=buffer_class, seed=seed)
        evaluation = EvalCallback(make_vec_env("CartPole-v1", seed=1000 + seed), n_eval_episodes=5, eval_freq=2000,
                                  callback_on_new_best=StopTrainingOnRewardThreshold(200), verbose=0)
        model.learn(30_000, callback=evaluation)
        return evaluation.best_mean_reward, model.num_timesteps

    for seed in (2, 3):
        theirs, ours = steps_to_solve(None, seed), steps_to_solve(sb3.ReplayBuffer, seed)
        assert theirs[0] >= 200 and ours[0] >= 200, (seed, theirs, ours)


def test_sb3_dqn_atari_with_frame_stack_trains():
    env = VecFrameStack(make_atari_env("PongNoFrameskip-v4", n_envs=2, seed=0), 4)
    model = DQN("CnnPolicy", env, buffer_size=2000, learning_starts=200, train_freq=4,
                replay_buffer_class=sb3.ReplayBuffer, seed=0)
    model.learn(600)
    rb = model.replay_buffer
    assert (rb.size(), rb.n_envs, rb.frame_stack) == (300, 2, 4)
    batch = rb.sample(32)
    assert batch.observations.shape == batch.next_observations.shape == (32, 4, 84, 84)
    assert batch.observations.dtype == torch.uint8 and batch.actions.shape == (32, 1)
    assert batch.dones.dtype == batch.rewards.dtype == torch.float32 and batch.dones.shape == (32, 1)
    # SB3's buffer would hold 2 x 1000 x 2 x 28,224 bytes of obs and next_obs.
    assert rb.nbytes < 2000 * 28_224 / 3


def test_sac_and_td3_with_box_actions():
    from stable_baselines3 import TD3

    for algo in (SAC, TD3):
        model = algo("MlpPolicy", "Pendulum-v1", learning_starts=100, replay_buffer_class=sb3.ReplayBuffer, seed=0,
                     policy_kwargs=dict(net_arch=[32, 32]))
        model.learn(200)
        batch = model.replay_buffer.sample(8)
        assert batch.actions.shape == (8, 1) and batch.actions.dtype == torch.float32
        assert batch.observations.shape == (8, 3)


def test_vec_normalize_applies_at_sample_time():
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=0))
    model = DQN("MlpPolicy", env, learning_starts=10**9, replay_buffer_class=sb3.ReplayBuffer, seed=0, device="cpu")
    model.learn(300)
    rb = model.replay_buffer
    twin = copy.deepcopy(rb)  # same stored transitions and sampling PRNG state
    normalized, raw = rb.sample(64, env=env), twin.sample(64)
    np.testing.assert_allclose(normalized.observations.numpy(), env.normalize_obs(raw.observations.numpy()))
    np.testing.assert_allclose(normalized.next_observations.numpy(), env.normalize_obs(raw.next_observations.numpy()))
    np.testing.assert_allclose(normalized.rewards.numpy(), env.normalize_reward(raw.rewards.numpy()))
    assert not np.allclose(normalized.observations.numpy(), raw.observations.numpy())


def test_save_and_load_replay_buffer(tmp_path):
    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=10**9, replay_buffer_class=sb3.ReplayBuffer, seed=0)
    model.learn(500)
    model.save_replay_buffer(tmp_path / "rb.pkl")
    other = DQN("MlpPolicy", "CartPole-v1", replay_buffer_class=sb3.ReplayBuffer, seed=1)
    other.load_replay_buffer(tmp_path / "rb.pkl")
    a, b = model.replay_buffer, other.replay_buffer
    assert type(b) is sb3.ReplayBuffer and (b.pos, b.full, b.size()) == (a.pos, a.full, a.size())
    for x, y in zip(a.sample(32), b.sample(32)):
        if x is not None:
            assert torch.equal(x, y)


@pytest.mark.filterwarnings("ignore:The last trajectory in the replay buffer will be truncated")
def test_optimize_memory_usage_with_timeouts_survives_a_second_learn_call():
    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=10**9, optimize_memory_usage=True,
                replay_buffer_class=sb3.ReplayBuffer, replay_buffer_kwargs=dict(handle_timeout_termination=True))
    model.learn(100)
    model.learn(100)  # SB3 then marks the last transition done; nothing to mark here
    assert model.replay_buffer.size() == 200


def test_import_dqn_fast_without_sb3(tmp_path):
    code = (
        "import sys; sys.modules['stable_baselines3'] = None\n"
        "import dqn_fast; dqn_fast.ReplayBuffer(10, (4,), 'float32')\n"
        "try:\n    import dqn_fast.sb3\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "ImportError: dqn_fast.sb3 needs Stable-Baselines3" in out.stdout


# ------------------------------------------------------------- CleanRL style


def test_cleanrl_one_line_change_stores_what_sb3_stores():
    # CleanRL's dqn_atari.py loop, with its buffer line changed to dqn_fast.sb3.ReplayBuffer
    # (same arguments: optimize_memory_usage=True, handle_timeout_termination=False) and fed
    # next to SB3's own (unoptimized) buffer, on a gymnasium vector env with frame stacks.
    def make():
        env = gym.make("BreakoutNoFrameskip-v4", frameskip=1, max_episode_steps=240)
        return gym.wrappers.FrameStackObservation(gym.wrappers.AtariPreprocessing(env), 4)

    envs = gym.vector.SyncVectorEnv([make], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.action_space.seed(0)
    args = (1000, envs.single_observation_space, envs.single_action_space, "cpu")
    rb = sb3.ReplayBuffer(*args, optimize_memory_usage=True, handle_timeout_termination=False)
    theirs = SB3Buffer(*args, handle_timeout_termination=False)
    obs, _ = envs.reset(seed=0)
    truncated = 0
    for _ in range(200):
        actions = envs.action_space.sample()
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        real_next_obs = next_obs.copy()
        for idx, trunc in enumerate(truncations):
            if trunc:
                real_next_obs[idx] = infos["final_obs"][idx]
        rb.add(obs, real_next_obs, actions, rewards, terminations, infos)
        theirs.add(obs, real_next_obs, actions, rewards, terminations, infos)
        obs = next_obs
        truncated += truncations.sum()
    assert rb.frame_stack == 4 and truncated > 0
    want = sb3_contents(theirs)
    assert sampled_contents(rb, 20 * sum(want.values())) == set(want)
    data = rb.sample(32)
    assert data.actions.dtype == torch.int64 and data.observations.shape == (32, 4, 84, 84)


def test_example_dqn_atari_runs(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "dqn_atari.py"
    cmd = [sys.executable, example, "--total-timesteps", "300", "--learning-starts", "100", "--buffer-size", "1000",
           "--cuda", "false", "--torch-threads", "1", "--save-buffer", str(tmp_path / "rb.bin")]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "td_loss=" in out.stdout
    buf = dqn_fast.ReplayBuffer.load(tmp_path / "rb.bin")
    assert (len(buf), buf.frame_stack, buf.obs_shape) == (300, 4, (4, 84, 84))
