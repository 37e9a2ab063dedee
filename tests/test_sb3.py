"""dqn_fast.sb3.ReplayBuffer inside Stable-Baselines3, against SB3's own buffer."""

import copy
import subprocess
import sys
import warnings
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


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_same_stream_same_transitions_atari_frame_stack(compression):
    # Real Pong frames through SB3's Atari wrappers, VecFrameStack and (DQN's)
    # VecTransposeImage, with time limits so stacks restart mid-run; also with
    # replay_buffer_kwargs=dict(compression="lz4"), the compressed frame store.
    env = VecFrameStack(make_atari_env("PongNoFrameskip-v4", n_envs=2, seed=0,
                                       env_kwargs=dict(max_episode_steps=150)), 4)
    rb = collect(env, 300, 10_000, dict(optimize_memory_usage=True, compression=compression))
    assert rb.ours.native.compression == compression
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


# ------------------------------------------------- n-step returns and SB3's arrays

import stable_baselines3.common.buffers as sb3_buffers  # noqa: E402

NStepBuffer = getattr(sb3_buffers, "NStepReplayBuffer", None)
needs_nstep = pytest.mark.skipif(NStepBuffer is None, reason="SB3 < 2.7 has no NStepReplayBuffer")

BOX3 = spaces.Box(-10, 10, (3,), np.float32)


def vec_stream(n_envs, steps, seed, breaks=False, p_end=0.08):
    """An SB3 VecEnv's add() arguments on random episodes: terminations, truncations, (optional) stream breaks.

    Yields (args for our buffer, args for SB3's). A break (an env's next obs
    does not continue its stream, with no done: a reset between learn() calls)
    is told to SB3 as a truncation of the transition before it (TimeLimit.truncated
    without done), which is what our buffer does with a break on its own.
    """
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n_envs, 3)).astype(np.float32)
    for _ in range(steps):
        next_obs = rng.normal(size=(n_envs, 3)).astype(np.float32)
        action = rng.integers(0, 2, n_envs)
        reward = rng.normal(size=n_envs).astype(np.float32)
        u = rng.random(n_envs)
        terminated, truncated = u < p_end, (u >= p_end) & (u < 2 * p_end)
        broken = breaks & (u >= 2 * p_end) & (u < 3 * p_end)
        done = terminated | truncated
        infos = [{"TimeLimit.truncated": bool(t)} if d else {} for d, t in zip(done, truncated)]
        theirs = [dict(info, **({"TimeLimit.truncated": True} if b else {})) for info, b in zip(infos, broken)]
        yield (obs, next_obs, action, reward, done, infos), (obs, next_obs, action, reward, done, theirs)
        obs = next_obs.copy()
        obs[done | broken] = rng.normal(size=(int((done | broken).sum()), 3))  # reset obs / the break


def feed_both(theirs, ours, stream):
    for mine, sb3_args in stream:
        theirs.add(*sb3_args)
        ours.add(*mine)


def every_slot(theirs, ours, seed=0, env=None):
    """SB3's _get_samples and our get_samples on the same (row, env) slots, each slot at least once.

    SB3 draws the env of each row from np.random inside _get_samples; the rows
    are laid out so that, for the env indices that draw will give, every
    written (row, env) slot appears.
    """
    n, size = theirs.n_envs, theirs.size()
    envs = np.random.RandomState(seed).randint(0, n, size=4 * n * size)
    rows = np.empty_like(envs)
    for e in range(n):
        at = np.flatnonzero(envs == e)
        assert len(at) >= size, "draw more rows"
        rows[at] = np.arange(len(at)) % size
    np.random.seed(seed)
    want = theirs._get_samples(rows, env=env)
    got = ours.get_samples(rows, envs, env=env)
    return want, got, rows, envs


@needs_nstep
@pytest.mark.parametrize("n_steps,gamma", [(3, 0.9), (5, 0.99), (2, 1.0)])
@pytest.mark.parametrize("handle_timeouts", [True, False], ids=["timeouts", "no-timeouts"])
@pytest.mark.parametrize(
    "n_envs,steps,size", [(1, 60, 100), (3, 150, 120), (2, 500, 90)], ids=["1env", "3envs-wrap", "2envs-wraps"]
)
def test_n_step_samples_equal_sb3_nstep_for_every_transition(n_steps, gamma, handle_timeouts, n_envs, steps, size):
    kwargs = dict(device="cpu", n_envs=n_envs, handle_timeout_termination=handle_timeouts)
    theirs = NStepBuffer(size, BOX3, spaces.Discrete(2), n_steps=n_steps, gamma=gamma, **kwargs)
    # Ours deduplicated and with timeouts (optimize_memory_usage changes nothing
    # here; SB3's NStepReplayBuffer refuses it).
    ours = sb3.ReplayBuffer(size, BOX3, spaces.Discrete(2), n_steps=n_steps, gamma=gamma, frame_reserve=4.0,
                            optimize_memory_usage=True, **kwargs)
    # Stream breaks too, where SB3 can be told of them (as truncations: see vec_stream).
    # Without timeout handling it cannot, and its windows run across them.
    feed_both(theirs, ours, vec_stream(n_envs, steps, seed=n_envs * 7 + n_steps, breaks=handle_timeouts))
    assert (ours.pos, ours.full) == (theirs.pos, theirs.full)
    assert len(ours.native) == ours.size() * n_envs  # the reserve kept every transition SB3 holds
    want, got, rows, envs = every_slot(theirs, ours)

    assert got.discounts is not None and want.discounts is not None
    for name in ("observations", "actions", "next_observations", "dones", "rewards", "discounts"):
        w, g = getattr(want, name), getattr(got, name)
        assert (g.shape, g.dtype, g.device) == (w.shape, w.dtype, w.device), name
    for name in ("observations", "actions", "next_observations", "dones"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # SB3 sums r_i * float32(gamma)**i in float32 and takes float32(gamma)**m;
    # the core sums in float64 and rounds once (the rule, checked
    # exactly in test_nstep.py), so the returns differ by float32 rounding:
    # a few eps of the terms' size (relative to a sum that may cancel to ~0).
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(got.rewards.numpy(), want.rewards.numpy(), rtol=0,
                               atol=2 * n_steps * eps * np.abs(ours.rewards).max())
    np.testing.assert_array_max_ulp(got.discounts.numpy(), want.discounts.numpy(), maxulp=1)

    # The stream had what the test claims, and windows of every length showed up.
    lengths = np.rint(np.log(want.discounts.numpy().ravel()) / np.log(gamma)) if gamma < 1 else None
    if lengths is not None:
        assert set(lengths.astype(int)) == set(range(1, n_steps + 1))
    assert want.dones.sum() > 0 and (want.dones == 0).sum() > 0
    if handle_timeouts:
        assert ours.timeouts.sum() > 0
    if steps > size // n_envs:
        assert ours.full and ours.native.total_adds > ours.native.capacity


def test_one_step_samples_have_no_discounts_as_sb3s_buffer():
    kwargs = dict(device="cpu", n_envs=2)
    theirs = SB3Buffer(100, BOX3, spaces.Discrete(2), **kwargs)
    ours = sb3.ReplayBuffer(100, BOX3, spaces.Discrete(2), frame_reserve=4.0, **kwargs)
    feed_both(theirs, ours, vec_stream(2, 80, seed=3))
    want, got, _, _ = every_slot(theirs, ours)
    assert want.discounts is None and got.discounts is None and ours.sample(8).discounts is None
    for w, g in zip(want[:5], got[:5]):
        assert torch.equal(g, w)


ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


@pytest.mark.parametrize("n_steps", [1, 3])
@pytest.mark.parametrize("handle_timeouts", [True, False], ids=["timeouts", "no-timeouts"])
@pytest.mark.parametrize("steps", [30, 130], ids=["filling", "wrapped"])
def test_array_properties_equal_sb3s_arrays(n_steps, handle_timeouts, steps):
    kwargs = dict(device="cpu", n_envs=2, handle_timeout_termination=handle_timeouts)
    theirs = SB3Buffer(100, BOX3, spaces.Discrete(2), **kwargs)
    ours = sb3.ReplayBuffer(100, BOX3, spaces.Discrete(2), n_steps=n_steps, frame_reserve=4.0, **kwargs)
    feed_both(theirs, ours, vec_stream(2, steps, seed=steps))
    for name in ARRAYS:
        w, g = getattr(theirs, name), getattr(ours, name)
        assert (g.shape, g.dtype) == (w.shape, w.dtype), name
        np.testing.assert_array_equal(g, w, err_msg=name)  # rows not written yet: zeros in both
        assert not g.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            g[0] = 1
        with pytest.raises(AttributeError):
            setattr(ours, name, w)
    newest = (ours.pos - 1) % ours.buffer_size
    last_obs, last_next = list(vec_stream(2, steps, seed=steps))[-1][0][:2]
    np.testing.assert_array_equal(ours.observations[newest], last_obs)
    np.testing.assert_array_equal(ours.next_observations[newest], last_next)
    assert ours.dones.sum() > 0 and (not handle_timeouts or ours.timeouts.sum() > 0)


def test_array_properties_agree_with_the_native_buffer():
    # The small arrays are kept in SB3's slots beside the native buffer: they
    # must say what the native buffer says about the same transitions.
    ours = sb3.ReplayBuffer(60, BOX3, spaces.Discrete(2), "cpu", n_envs=3, frame_reserve=4.0)
    feed_both(SB3Buffer(60, BOX3, spaces.Discrete(2), "cpu", n_envs=3), ours, vec_stream(3, 47, seed=5))
    rows, envs = np.meshgrid(np.arange(ours.buffer_size), np.arange(3), indexing="ij")
    b = ours.native.get(ours.transition_ids(rows.ravel(), envs.ravel()))
    as_rows = lambda x: x.reshape(ours.buffer_size, 3, *x.shape[1:])  # noqa: E731
    np.testing.assert_array_equal(ours.actions, as_rows(b.action))
    np.testing.assert_array_equal(ours.rewards, as_rows(b.reward))
    np.testing.assert_array_equal(ours.dones, as_rows(b.terminated | b.truncated))
    np.testing.assert_array_equal(ours.timeouts, as_rows(b.truncated))
    np.testing.assert_array_equal(ours.observations, as_rows(b.obs))
    assert ours.native.total_adds == 47 * 3 and ours.full


def test_arrays_of_transitions_dropped_early_are_zeros():
    # Episodes of 1-2 steps with no frame reserve: the native buffer drops its
    # oldest transitions before SB3's ring would (see dqn_fast.ReplayBuffer).
    theirs = SB3Buffer(100, BOX3, spaces.Discrete(2), "cpu", n_envs=2)
    ours = sb3.ReplayBuffer(100, BOX3, spaces.Discrete(2), "cpu", n_envs=2, frame_reserve=0.0)
    feed_both(theirs, ours, vec_stream(2, 200, seed=1, p_end=0.3))
    stored = ours._stored_slots()
    assert 0 < stored.sum() < stored.size == len(ours.native) + (~stored).sum()
    for name in ARRAYS:
        got, want = getattr(ours, name), getattr(theirs, name)
        np.testing.assert_array_equal(got[stored], want[stored], err_msg=name)
        assert not got[~stored].any(), name
    row, env = np.argwhere(~stored)[0]
    with pytest.raises(ValueError, match=str(ours.transition_ids(row, env))):
        ours.get_samples(np.array([row]), np.array([env]))


def test_transition_ids_follow_sb3s_slots_and_check_them():
    ours = sb3.ReplayBuffer(10, BOX3, spaces.Discrete(2), "cpu", n_envs=2)
    feed_both(SB3Buffer(10, BOX3, spaces.Discrete(2), "cpu", n_envs=2), ours, vec_stream(2, 7, seed=0))
    assert (ours.pos, ours.full) == (2, True)  # 7 adds in 5 rows: rows 0, 1 hold adds 5, 6
    np.testing.assert_array_equal(ours.transition_ids(np.array([0, 1, 1, 4]), np.array([0, 0, 1, 1])), [10, 12, 13, 9])
    with pytest.raises(ValueError, match=r"batch_inds must be in \[0, 5\)"):
        ours.transition_ids(np.array([5]))
    with pytest.raises(ValueError, match=r"env_indices must be in \[0, 2\)"):
        ours.transition_ids(np.array([0]), np.array([2]))
    with pytest.raises(TypeError, match="batch_inds must be integers"):
        ours.transition_ids(np.array([0.5]))
    fresh = sb3.ReplayBuffer(10, BOX3, spaces.Discrete(2), "cpu", n_envs=2)
    feed_both(SB3Buffer(10, BOX3, spaces.Discrete(2), "cpu", n_envs=2), fresh, vec_stream(2, 2, seed=0))
    with pytest.raises(ValueError, match=r"row 3 has not been written yet \(size\(\) is 2\)"):
        fresh.transition_ids(np.array([1, 3]))


def test_old_pickles_without_the_small_arrays_rebuild_them():
    ours = sb3.ReplayBuffer(60, BOX3, spaces.Discrete(2), "cpu", n_envs=2, frame_reserve=4.0)
    feed_both(SB3Buffer(60, BOX3, spaces.Discrete(2), "cpu", n_envs=2), ours, vec_stream(2, 41, seed=2))
    old = {k: v for k, v in ours.__dict__.items() if k not in ("_actions", "_rewards", "_dones", "_timeouts",
                                                               "n_steps", "gamma")}
    loaded = sb3.ReplayBuffer.__new__(sb3.ReplayBuffer)
    loaded.__setstate__(copy.deepcopy(old))
    assert (loaded.n_steps, loaded.sample(4).discounts) == (1, None)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(ours, name), err_msg=name)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(n_steps=0), ValueError, "n_steps must be at least 1, got 0"),
        (dict(n_steps=2.0), TypeError, "n_steps must be an int, got float"),
        (dict(n_steps=True), TypeError, "n_steps must be an int, got bool"),
        (dict(gamma=1.5), ValueError, "gamma must be between 0 and 1, got 1.5"),
        (dict(gamma=float("nan")), ValueError, "gamma must be between 0 and 1"),
        (dict(gamma="0.9"), TypeError, "gamma must be a float, got str"),
    ],
)
def test_bad_n_step_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sb3.ReplayBuffer(100, BOX3, spaces.Discrete(2), "cpu", **kwargs)


# --------------------------------------------------------- SB3's DQN, n-step


def test_dqn_replay_buffer_kwargs_n_steps_trains_on_n_step_samples():
    # The documented usage. The model's gamma goes in too: SB3 does not pass it.
    model = DQN("MlpPolicy", "CartPole-v1", gamma=0.9, learning_starts=100, train_freq=8, batch_size=32,
                replay_buffer_class=sb3.ReplayBuffer, replay_buffer_kwargs=dict(n_steps=3, gamma=0.9), seed=0,
                policy_kwargs=dict(net_arch=[16]), device="cpu")
    model.learn(400)
    rb = model.replay_buffer
    assert (rb.n_steps, rb.native.n_step, rb.native.gamma) == (3, 3, 0.9) and model._n_updates > 0
    batch = rb.sample(256)
    discounts = batch.discounts.numpy().ravel()
    assert batch.discounts.shape == (256, 1) and batch.discounts.dtype == torch.float32
    assert np.isin(np.round(discounts.astype(np.float64), 6), [0.9, 0.81, 0.729]).all()
    assert (discounts < 0.8).any()  # full 3-step windows
    # CartPole pays 1 a step: an m-step window returns 1 + 0.9 + ... (m terms).
    m = np.rint(np.log(discounts) / np.log(0.9)).astype(int)
    np.testing.assert_allclose(batch.rewards.numpy().ravel(), (1 - 0.9**m) / (1 - 0.9), rtol=1e-6)


def test_dqn_n_steps_with_this_buffer_class_warns_that_it_does_not_arrive():
    # SB3 gives DQN(n_steps=...) only to its own NStepReplayBuffer: this
    # buffer is built one-step, and says so (SB3 >= 2.9 warns too).
    with pytest.warns(UserWarning, match=r"DQN\(n_steps=3\) does not reach dqn_fast.sb3.ReplayBuffer.*"
                                         r"replay_buffer_kwargs=dict\(n_steps=3, gamma=0.99\)"):
        model = DQN("MlpPolicy", "CartPole-v1", n_steps=3, replay_buffer_class=sb3.ReplayBuffer, device="cpu")
    assert model.replay_buffer.n_steps == 1
    with pytest.warns(UserWarning, match=r"gamma=0.99 \(n_steps=3\) but DQN has gamma=0.9"):
        DQN("MlpPolicy", "CartPole-v1", gamma=0.9, replay_buffer_class=sb3.ReplayBuffer,
            replay_buffer_kwargs=dict(n_steps=3), device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DQN("MlpPolicy", "CartPole-v1", gamma=0.9, replay_buffer_class=sb3.ReplayBuffer,
            replay_buffer_kwargs=dict(n_steps=3, gamma=0.9), device="cpu")
    assert not [w for w in caught if "n_steps" in str(w.message) or "gamma" in str(w.message)]  # the documented usage


# ------------------------------------------ the drop-in trains the same as SB3's buffer

DRAWS: list = []  # (batch_inds, env_indices) of every batch SB3's buffer drew, in order


def recording(base):
    class Recording(base):
        def _get_samples(self, batch_inds, env=None):
            # The env indices SB3 is about to draw, read off a copy of np.random's state.
            rng = np.random.RandomState()
            rng.set_state(np.random.get_state())
            DRAWS.append((batch_inds.copy(), rng.randint(0, self.n_envs, size=batch_inds.shape)))
            return super()._get_samples(batch_inds, env)

    return Recording


class Replaying(sb3.ReplayBuffer):
    def sample(self, batch_size, env=None):
        rows, envs = DRAWS.pop(0)
        # Make SB3's two draws too, so np.random (epsilon-greedy exploration) stays in step.
        upper = self.buffer_size if self.full else self.pos
        np.testing.assert_array_equal(np.random.randint(0, upper, size=batch_size), rows)
        np.testing.assert_array_equal(np.random.randint(0, self.n_envs, size=rows.shape), envs)
        return self.get_samples(rows, envs, env)


@pytest.mark.parametrize(
    "theirs,kwargs",
    [
        (SB3Buffer, {}),
        # gamma=0.75: every partial sum of CartPole's 1-rewards and every
        # 0.75**m is exact in float32, so SB3's float32 sums equal the core's.
        pytest.param(NStepBuffer, dict(n_steps=3, gamma=0.75), marks=needs_nstep),
    ],
    ids=["one-step", "n_steps=3"],
)
def test_sb3_dqn_trains_bit_identically_on_the_same_draws(theirs, kwargs):
    def train(buffer_class, buffer_kwargs):
        model = DQN("MlpPolicy", "CartPole-v1", gamma=kwargs.get("gamma", 0.99), learning_rate=1e-3, batch_size=64,
                    buffer_size=1000, learning_starts=200, train_freq=4, gradient_steps=2, target_update_interval=100,
                    exploration_fraction=0.5, policy_kwargs=dict(net_arch=[64, 64]), replay_buffer_class=buffer_class,
                    replay_buffer_kwargs=buffer_kwargs, seed=4, device="cpu")
        initial = copy.deepcopy(model.policy.state_dict())
        model.learn(2000)  # 900 updates; 2,000 adds wrap the 1,000-slot ring
        return model, initial

    DRAWS.clear()
    sb3_model, initial = train(recording(theirs), kwargs)
    recorded = len(DRAWS)
    # seed=0: no draw from np.random for our PRNG; CartPole's short early
    # episodes need more than the default frame reserve to keep all 1,000.
    ours_model, _ = train(Replaying, dict(kwargs, seed=0, frame_reserve=1.0))
    assert recorded == sb3_model._n_updates == ours_model._n_updates >= 500 and not DRAWS
    assert ours_model.replay_buffer.full and ours_model.num_timesteps == 2000
    theirs_params, ours_params = sb3_model.policy.state_dict(), ours_model.policy.state_dict()
    assert not all(torch.equal(initial[k], theirs_params[k]) for k in initial)  # it did learn
    for name, value in theirs_params.items():
        assert torch.equal(ours_params[name], value), name
