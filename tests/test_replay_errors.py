"""Bad input: a clear exception naming what was expected, and the buffer unchanged."""

import numpy as np
import pytest

from dqn_fast import ReplayBuffer
from reference import EpisodeStreams, ReferenceReplay, StreamConfig, assert_batch_matches

CFG = StreamConfig(num_envs=2, frame_stack=4, frame_shape=(6, 7), palette=256)


@pytest.fixture
def filled():
    streams = EpisodeStreams(CFG, 0)
    buf = ReplayBuffer(50, (4, 6, 7), frame_stack=4, num_envs=2, seed=1)
    ref = ReferenceReplay(50)
    for _ in range(30):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
    return buf, ref, streams


def assert_unchanged_and_working(buf, ref, streams):
    assert buf.total_adds == ref.next_id
    assert len(buf) == min(ref.next_id, 50)
    assert_batch_matches(buf.sample(32), ref, range(ref.next_id - len(buf), ref.next_id))
    args = streams.step()  # and it keeps accepting good adds
    ref.add(*args)
    buf.add(*args)
    assert_batch_matches(buf.sample(32), ref)


def good_add(streams):
    obs, action, reward, next_obs, term, trunc = streams.step()
    return dict(obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=term, truncated=trunc)


@pytest.mark.parametrize(
    "field,value,error,match",
    [
        ("obs", np.zeros((2, 4, 6, 7), np.float32), TypeError, "obs must have dtype uint8.*got float32"),
        ("next_obs", np.zeros((2, 4, 6, 8), np.uint8), ValueError, r"next_obs must have shape \(2, 4, 6, 7\).*got \(2, 4, 6, 8\)"),
        ("obs", np.zeros((4, 6, 7), np.uint8), ValueError, r"obs must have shape \(2, 4, 6, 7\)"),
        ("obs", [[1, 2]], TypeError, "obs must have dtype uint8"),
        ("action", np.zeros(3, np.int64), ValueError, r"action must have shape \(2,\)"),
        ("action", np.zeros(2, np.float64), TypeError, "action must have a dtype castable to int64"),
        ("action", "left", TypeError, "action must have a dtype castable to int64"),
        ("reward", np.zeros(5, np.float32), ValueError, r"reward must have shape \(2,\)"),
        ("reward", np.array(["a", "b"]), TypeError, "reward must have a dtype castable to float32"),
        ("terminated", np.zeros(2, np.float32), TypeError, "terminated must have dtype bool"),
        ("truncated", np.array([0, 2]), ValueError, "truncated must hold only 0/1"),
        ("truncated", np.zeros(3, bool), ValueError, r"truncated must have shape \(2,\)"),
        # a scalar stands for one env only: with 2 envs it is a shape error
        ("reward", 1.5, ValueError, r"reward must have shape \(2,\)"),
        ("terminated", False, ValueError, r"terminated must have shape \(2,\)"),
        ("truncated", True, ValueError, r"truncated must have shape \(2,\)"),
        ("action", 3, ValueError, r"action must have shape \(2,\)"),
    ],
)
def test_bad_add_is_rejected_and_changes_nothing(filled, field, value, error, match):
    buf, ref, streams = filled
    args = good_add(EpisodeStreams(CFG, 99))
    args[field] = value
    with pytest.raises(error, match=match):
        buf.add(**args)
    assert_unchanged_and_working(buf, ref, streams)


def test_lenient_inputs_that_lose_nothing_are_accepted():
    buf = ReplayBuffer(10, (3,), obs_dtype=np.float32, seed=0)
    obs = np.arange(3, dtype=np.float32)
    buf.add(obs, 2, 1.5, obs + 1, False, np.bool_(True))  # unbatched, python scalars
    buf.add(obs[None], np.array([1], np.int32), np.array([0.5]), (obs + 2)[None], np.array([1]), np.array([0]))
    buf.add(np.asfortranarray(np.ones((1, 3), np.float32))[:, ::1], 0, 0, np.ones(3, np.float32), 0, 0)
    assert len(buf) == 3


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda b: b.empty_batch(8)._replace(obs=np.empty((8, 4, 6, 7), np.int16)), TypeError, "out.obs must have dtype uint8"),
        (lambda b: b.empty_batch(8)._replace(obs=np.empty((7, 4, 6, 7), np.uint8)), ValueError, r"out.obs must have shape \(8, 4, 6, 7\)"),
        (lambda b: b.empty_batch(8)._replace(reward=np.empty(8, np.float64)), TypeError, "out.reward must have dtype float32"),
        (lambda b: b.empty_batch(8)._replace(obs=np.empty((8, 6, 7, 4), np.uint8).transpose(0, 3, 1, 2)), ValueError, "out.obs must be C-contiguous"),
        (lambda b: b.empty_batch(8)._replace(next_obs=read_only((8, 4, 6, 7))), ValueError, "out.next_obs must be writable"),
        (lambda b: b.empty_batch(8)._replace(ids=[0] * 8), TypeError, "out.ids must be a numpy array or CPU torch tensor"),
        (lambda b: (lambda o: o._replace(next_obs=o.obs))(b.empty_batch(8)), ValueError, "must not share memory"),
        (lambda b: b.empty_batch(4, window=True)._replace(frames=np.empty((4, 4, 6, 7), np.uint8)), ValueError, r"out.frames must have shape \(4, 5, 6, 7\)"),
    ],
)
def test_bad_output_is_rejected_and_changes_nothing(filled, make, error, match):
    buf, ref, streams = filled
    with pytest.raises(error, match=match):
        buf.sample_into(make(buf))
    assert_unchanged_and_working(buf, ref, streams)


def read_only(shape):
    a = np.empty(shape, np.uint8)
    a.flags.writeable = False
    return a


def test_bad_batch_sizes_and_empty_buffer(filled):
    buf, ref, streams = filled
    for bad in (0, -3):
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            buf.sample(bad)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        buf.sample(2.5)
    empty = ReplayBuffer(10, (4,), obs_dtype=np.float32)
    with pytest.raises(ValueError, match="empty replay buffer"):
        empty.sample(4)
    with pytest.raises(ValueError, match="empty replay buffer"):
        empty.sample_into(empty.empty_batch(4))
    assert_unchanged_and_working(buf, ref, streams)


def test_torch_outputs_must_be_on_the_cpu_and_plain(filled):
    torch = pytest.importorskip("torch")
    buf, ref, streams = filled
    out = buf.empty_batch(4, torch=True)
    with pytest.raises(TypeError, match="out.reward must have dtype float32"):
        buf.sample_into(out._replace(reward=torch.empty(4, dtype=torch.float64)))
    with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
        if not torch.cuda.is_available():
            buf.empty_batch(4, pin_memory=True)
        else:
            raise ValueError("pin_memory=True needs CUDA (skipped: CUDA is present)")
    assert_unchanged_and_working(buf, ref, streams)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(capacity=0), ValueError, "capacity must be at least 1, got 0"),
        (dict(capacity=2.5), TypeError, "capacity must be an int"),
        (dict(capacity=3, num_envs=4), ValueError, "capacity=3 is smaller than one add needs: num_envs=4"),
        (dict(obs_shape=(3, 84, 84)), ValueError, r"must have frame_stack=4 frames on axis 0"),
        (dict(obs_shape=(4, -1)), ValueError, "obs_shape must be a tuple of positive ints"),
        (dict(obs_dtype=object), TypeError, "obs_dtype must be a bool, integer or float dtype"),
        (dict(obs_dtype="not a dtype"), TypeError, "obs_dtype must be a numpy dtype"),
        (dict(stack_axis=1), ValueError, "stack_axis must be 0"),
        (dict(seed=-1), ValueError, "seed must be None or an int in"),
        (dict(frame_stack=0), ValueError, "frame_stack must be at least 1"),
        (dict(frame_reserve=-0.5), ValueError, "frame_reserve must be a fraction"),
        (dict(frame_reserve=10**400), ValueError, "frame_reserve must be a fraction"),  # was OverflowError
        # bounds, also what a loaded file's header is held to
        (dict(num_envs=3_000_000, capacity=3_000_000), ValueError, "num_envs must be at most 1048576"),
        (dict(sample_threads=257), ValueError, "sample_threads must be between 0 and 256"),
        (dict(frame_stack=65, obs_shape=(65, 4)), ValueError, "frame_stack must be at most 64"),
        (dict(capacity=2**64), ValueError, "capacity must be at most"),
        (dict(obs_shape=(4, 2**63)), ValueError, "obs_shape must be a tuple of positive ints below 2"),
        # the core reads native values only
        (dict(obs_dtype=">f4"), TypeError, "obs_dtype must be in native byte order"),
        (dict(action_dtype=">i8"), TypeError, "action_dtype must be in native byte order"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    args = dict(capacity=100, obs_shape=(4, 84, 84), frame_stack=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ReplayBuffer(**args)


def test_too_large_a_buffer_is_a_memory_error_stating_the_bytes():
    with pytest.raises(MemoryError, match=r"cannot allocate \d+ bytes"):
        ReplayBuffer(2_000_000_000, (4, 84, 84), frame_stack=4)  # ~15 TB
    with pytest.raises(MemoryError, match="bytes"):
        ReplayBuffer(10**18, (4,), obs_dtype=np.float32)


@pytest.mark.parametrize(
    "kwargs",
    [
        # capacity * frame_bytes wraps to ~30 MB in uint64: this used to construct, then segfault on add
        dict(capacity=2**20, obs_shape=(17592118935808,), frame_reserve=0.0),
        dict(capacity=10, obs_shape=(2**40, 2**40)),  # one frame's bytes wrap
        dict(capacity=10, obs_shape=(3,), action_shape=(2**40, 2**40)),  # one action's bytes wrap
        dict(capacity=2**31, obs_shape=(3,), action_shape=(2**33,)),  # capacity * action bytes wraps
    ],
)
def test_sizes_that_overflow_64_bits_are_a_memory_error_at_construction(kwargs):
    with pytest.raises(MemoryError, match="bytes"):
        ReplayBuffer(**kwargs)


def test_per_env_state_is_counted_in_nbytes_and_the_memory_check():
    # Streams and add plans are touched at construction (the frame store is not):
    # the resident set must not grow by more than nbytes says.
    from dqn_fast.bench.timing import rss_bytes

    before = rss_bytes()
    buf = ReplayBuffer(2**20, (1,), num_envs=2**20, frame_reserve=0.0)
    grown = rss_bytes() - before
    assert buf.nbytes >= 2**20 * 80  # streams + plans, not just the arrays
    assert grown <= buf.nbytes
    del buf


def test_big_endian_inputs_are_converted_or_rejected_never_misread():
    buf = ReplayBuffer(10, (3,), obs_dtype=np.float32, seed=0)
    obs = np.arange(3, dtype=np.float32)
    # actions and rewards are converted anyway: their byte order is honoured
    buf.add(obs, np.array([3], ">i8"), np.array([1.0], ">f4"), obs + 1, np.array([1], ">i2"), False)
    got = buf.sample(1)
    assert got.action[0] == 3 and got.reward[0] == 1.0 and got.terminated[0]  # were 2^56 * 3, 4.6e-41
    # observations and outputs are not: a TypeError naming the byte order
    with pytest.raises(TypeError, match="obs must be in native byte order.*big-endian"):
        buf.add(obs.astype(">f4"), 0, 0.0, obs, False, False)
    with pytest.raises(TypeError, match="out.obs must be in native byte order.*big-endian"):
        buf.sample_into(buf.empty_batch(2)._replace(obs=np.empty((2, 3), ">f4")))
    with pytest.raises(TypeError, match="out.reward must be in native byte order"):
        buf.sample_into(buf.empty_batch(2)._replace(reward=np.empty(2, ">f4")))
    assert len(buf) == 1 and buf.sample(1).action[0] == 3


@pytest.mark.parametrize(
    "action,reward,match",
    [
        (2**63, 0.0, "action 9223372036854775808 does not fit int64"),  # was RuntimeError
        (-(2**63) - 1, 0.0, "does not fit int64"),
        (2**64, 0.0, "does not fit int64"),
        (0, 10**400, "reward 1000.* is too large for float32"),  # was OverflowError
        (0, 1e300, r"reward 1e\+300 is too large for float32"),  # was stored as inf
        (0, np.array([1e300]), "reward holds a value too large for float32"),
        (0, np.array([-3.5e38]), "reward holds a value too large for float32"),
    ],
)
def test_scalars_that_do_not_fit_are_value_errors(action, reward, match):
    buf = ReplayBuffer(10, (3,), obs_dtype=np.float32, seed=0)
    obs = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=match):
        buf.add(obs, action, reward, obs, False, False)
    assert len(buf) == 0
    buf.add(obs, 2**63 - 1, float("inf"), obs, False, False)  # the extremes that fit are stored as given
    got = buf.sample(1)
    assert got.action[0] == 2**63 - 1 and got.reward[0] == np.inf


def test_integer_actions_outside_the_action_dtype_are_rejected_not_wrapped():
    buf = ReplayBuffer(10, (3,), obs_dtype=np.float32, action_dtype=np.int8, num_envs=2, seed=0)
    obs = np.zeros((2, 3), np.float32)
    flags = np.zeros(2, bool)
    for bad in (np.array([1, 300]), np.array([-129, 0]), np.array([2**63, 0], np.uint64)):
        with pytest.raises(ValueError, match="action .* does not fit int8"):
            buf.add(obs, bad, np.zeros(2), obs, flags, flags)
    buf.add(obs, np.array([-128, 127]), np.zeros(2), obs, flags, flags)
    assert sorted(buf.sample(64).action.tolist())[::63] == [-128, 127]


def test_narrowing_to_a_float_action_dtype_must_not_overflow():
    buf = ReplayBuffer(10, (3,), obs_dtype=np.float32, action_dtype=np.float16, seed=0)
    obs = np.zeros(3, np.float32)
    for bad in ([1e6], np.array([100000]), np.array([65520.0]), np.array([-(2**63)])):  # each would become inf
        with pytest.raises(ValueError, match="action holds a value too large for float16"):
            buf.add(obs, bad, 0.0, obs, False, False)
    buf.add(obs, np.array([65519.0]), 0.0, obs, False, False)  # rounds to float16's max: kept
    assert buf.sample(1).action[0] == np.finfo(np.float16).max


def test_misaligned_arrays_are_copied_as_inputs_and_refused_as_outputs():
    # The core reads rewards and writes ids/rewards as typed values: never through a misaligned pointer.
    buf = ReplayBuffer(10, (3,), obs_dtype=np.float32, num_envs=2, seed=0)
    raw = np.zeros(2 * 4 + 1, np.uint8)
    reward = raw[1:].view(np.float32)
    reward[:] = [1.5, -2.0]
    assert not reward.flags.aligned
    obs, flags = np.zeros((2, 3), np.float32), np.zeros(2, bool)
    buf.add(obs, np.array([0, 1]), reward, obs, flags, flags)
    got = buf.sample(16)
    assert {(a, r) for a, r in zip(got.action.tolist(), got.reward.tolist())} <= {(0, 1.5), (1, -2.0)}
    for name, dtype in (("ids", np.int64), ("reward", np.float32)):
        raw = np.zeros(4 * np.dtype(dtype).itemsize + 1, np.uint8)
        with pytest.raises(ValueError, match=f"out.{name} must be aligned"):
            buf.sample_into(buf.empty_batch(4)._replace(**{name: raw[1:].view(dtype)}))
    assert len(buf) == 2


def test_the_core_class_checks_dtype_kinds_itself():
    # replay.py checks them first; the bindings must not trust that (object dtypes would copy pointers).
    from dqn_fast import _core

    with pytest.raises(TypeError, match="bool, integer or float"):
        _core.ReplayBufferCore(10, 1, 1, [1], np.dtype(object), [], np.dtype(np.int64), 0, False, 0.0, 0)
    with pytest.raises(ValueError, match="positive dimensions"):
        _core.ReplayBufferCore(10, 1, 1, [-1], np.dtype(np.uint8), [], np.dtype(np.int64), 0, False, 0.0, 0)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(seed="x"), TypeError, "seed must be None or an int"),
        (dict(stack_axis="x"), TypeError, "stack_axis must be an int"),
        (dict(obs_shape=(1,) * 33, frame_stack=1), ValueError, "at most 32 dimensions"),
    ],
)
def test_wrong_types_are_type_errors_and_shapes_have_bounded_rank(kwargs, error, match):
    args = dict(capacity=100, obs_shape=(4, 84, 84), frame_stack=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ReplayBuffer(**args)


COPY_UNDER_A_LIMIT = """
import resource, re, numpy as np
from dqn_fast import ReplayBuffer
buf = ReplayBuffer(4, (1 << 27,), seed=0)  # 128 MiB frames, untouched
obs = np.broadcast_to(np.uint8(7), (1 << 27,))  # zero-stride: the buffer must copy it
vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))  # no room for the copy
try:
    buf.add(obs, 0, 0.0, obs, False, False)
except MemoryError:
    print("MemoryError", len(buf))
"""


def test_an_input_copy_that_cannot_be_allocated_is_a_memory_error_under_an_address_space_limit(tmp_path):
    # numpy's copy fails; the bindings used to read through the null array it left (segfault).
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", COPY_UNDER_A_LIMIT], cwd=tmp_path, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-600:]
    assert out.stdout.decode().split() == ["MemoryError", "0"]
