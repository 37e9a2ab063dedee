"""Fuzzing the public API against its contract: every call either does exactly
what it documents or raises TypeError, ValueError or MemoryError
(ReplayFileError is a ValueError); never a crash, hang, RuntimeError,
OverflowError, SystemError or silently wrong data; and a rejected call leaves
the buffer's contents unchanged and working.

Attack classes covered:
  * add, obs/next_obs: every numpy dtype in both byte orders; wrong, empty and
    huge (zero-stride) shapes; non-contiguous, Fortran-order, read-only and
    zero-stride views; torch tensors (right and wrong dtype, non-contiguous);
    Python lists; junk (None, str, dict, object()).
  * add, action: huge and negative Python ints (2**63, -2**63-1, 2**64,
    10**30), numpy scalars and 0-d arrays of every dtype and byte order, bool,
    lists, torch tensors, junk; ints that do not fit a narrow action dtype.
  * add, reward: NaN, +-inf, 1e300, 10**400, every dtype and byte order,
    Python vs numpy scalars, lists, torch, junk.
  * add, terminated/truncated: ints outside 0/1, floats, every dtype, junk.
  * constructor: hostile capacity, obs_shape, obs_dtype, frame_stack,
    num_envs, action_shape, action_dtype, seed, stack_axis, frame_reserve,
    sample_threads, including sizes whose byte counts wrap 2**64.
  * sample / empty_batch: hostile batch sizes and window flags.
  * sample_into: outputs of the wrong dtype, byte order, shape or layout,
    read-only, zero-stride, overlapping, torch tensors of the wrong dtype or on
    the meta device, objects that are not a Batch.
  * save / load: hostile paths, directories, files that are not buffers.

DQN_FAST_FUZZ_EXAMPLES sets the examples per fuzz test (fewer under sanitizers).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dqn_fast import ReplayBuffer, ReplayFileError
from reference import EpisodeStreams, ReferenceReplay, StreamConfig

EXAMPLES = int(os.environ.get("DQN_FAST_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    derandomize=True, deadline=None, max_examples=EXAMPLES, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ALLOWED = (TypeError, ValueError, MemoryError)  # ReplayFileError is a ValueError
HAVE_TORCH = importlib.util.find_spec("torch") is not None  # imported lazily: it is slow to import

# Every numeric dtype in both byte orders (one-byte types have none), then non-numeric ones.
DTYPES = sorted({np.dtype(c).newbyteorder(o) for c in "?bBhHiIlLqQefdgFDG" for o in "<>"}, key=lambda d: d.str)
DTYPES += [np.dtype(object), np.dtype("U3"), np.dtype("S2"), np.dtype("M8[s]"), np.dtype("m8[s]"), np.dtype("V8")]
JUNK = [None, "3", b"\x00", {}, {"a": 1}, object(), (), [], [[]], 2.5, 1j, slice(None), Ellipsis, np.float64("nan")]
BIG_INTS = [2**63, -(2**63) - 1, 2**64, 2**64 - 1, 10**30, -(10**30), 2**63 - 1, -(2**63), -1, 0, 300]


@dataclass(frozen=True)
class Setup:
    name: str
    kwargs: dict
    stream: StreamConfig


SETUPS = [
    Setup("atari", dict(capacity=40, obs_shape=(4, 6, 7), frame_stack=4, num_envs=2),
          StreamConfig(num_envs=2, frame_stack=4, frame_shape=(6, 7), palette=256, max_len=8)),
    Setup("channel_last", dict(capacity=40, obs_shape=(6, 7, 4), frame_stack=4, stack_axis=-1),
          StreamConfig(frame_stack=4, frame_shape=(6, 7), stack_axis=-1, palette=256, max_len=8)),
    Setup("vectors", dict(capacity=40, obs_shape=(5,), obs_dtype=np.float32),
          StreamConfig(frame_stack=1, frame_shape=(5,), dtype=np.float32)),
    Setup("action2", dict(capacity=40, obs_shape=(5,), obs_dtype=np.float32, num_envs=2, action_shape=(2,)),
          StreamConfig(num_envs=2, frame_stack=1, frame_shape=(5,), dtype=np.float32, action_shape=(2,))),
]
setups = st.sampled_from(SETUPS)


def filled(setup: Setup, steps: int = 25):
    streams = EpisodeStreams(setup.stream, 0)
    buf = ReplayBuffer(seed=1, **setup.kwargs)
    ref = ReferenceReplay(setup.kwargs["capacity"])
    for _ in range(steps):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
    return buf, ref, streams


# ---------------------------------------------------------------- checking
def to_np(x):
    return x.detach().numpy() if hasattr(x, "detach") and not isinstance(x, np.ndarray) else np.asarray(x)


def same_float(a, b) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))  # NaN rewards are stored, and NaN != NaN


SAME = ("obs", "next_obs", "action", "reward", "terminated", "truncated", "ids")  # assert_same's order


def assert_same(obs, next_obs, action, reward, term, trunc, ids, ref, live):
    """Each sampled transition equals the reference's transition with its id."""
    ids = to_np(ids).tolist()
    if all(t in live for t in ids):  # fast path: the whole batch at once; item by item only to name a mismatch
        want = [ref.transitions[t] for t in ids]
        got = [to_np(x) for x in (obs, action, reward, next_obs)]
        if all(np.array_equal(g, np.array([w[j] for w in want]).reshape(g.shape), equal_nan=g.dtype.kind in "fc")
               for j, g in enumerate(got)) and to_np(term).tolist() == [w[4] for w in want] \
                and to_np(trunc).tolist() == [w[5] for w in want]:
            return
    for i, tid in enumerate(ids):
        assert tid in live, f"id {tid} is not among the stored ids {live}"
        r_obs, r_action, r_reward, r_next, r_term, r_trunc = ref.transitions[tid]
        np.testing.assert_array_equal(to_np(obs)[i], r_obs, err_msg=f"obs of id {tid}")
        np.testing.assert_array_equal(to_np(next_obs)[i], r_next, err_msg=f"next_obs of id {tid}")
        np.testing.assert_array_equal(to_np(action)[i], r_action, err_msg=f"action of id {tid}")
        assert same_float(float(to_np(reward)[i]), float(r_reward)), f"reward of id {tid}"
        assert bool(to_np(term)[i]) == r_term and bool(to_np(trunc)[i]) == r_trunc, f"flags of id {tid}"


def assert_holds(buf, ref):
    """The buffer holds exactly the reference's most recent adds: every one of them is checked."""
    assert buf.total_adds == ref.next_id
    assert len(buf) == min(ref.next_id, ref.capacity)
    live, seen = ref.ring_ids(), set()
    for _ in range(30):
        b = buf.sample(64)
        ids = b.ids.tolist()
        new = [i for i, t in enumerate(ids) if t not in seen and not seen.add(t)]  # first sighting of each id
        assert_same(*(getattr(b, n)[new] for n in SAME), ref, live)
        if len(seen) == len(live):
            return
    pytest.fail(f"30 batches of 64 never returned ids {sorted(set(live) - seen)}")


def assert_unchanged_and_working(buf, ref, streams):
    assert_holds(buf, ref)
    args = streams.step()  # and it keeps accepting good adds
    ref.add(*args)
    buf.add(*args)
    assert_holds(buf, ref)


def call(fn, *args, **kwargs):
    """(True, fn's result), or (False, None) when it raised an allowed error; any other error propagates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy casts of hostile values warn
        try:
            return True, fn(*args, **kwargs)
        except ALLOWED:
            return False, None


# ---------------------------------------------------------------- add
class Lossy(Exception):
    """The value cannot be stored as documented: the buffer must have rejected it."""


def stored(value, dtype, item, ne, rounding=False):
    """What the buffer must store for an accepted `value`: a (ne, *item) array of `dtype`.

    Exact conversions only (an int that does not fit, 2 as a flag, a float as
    an int lose information), except that rewards round to float32.
    """
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            src = to_np(value)
            if src.dtype.kind not in "biufO" or (src.dtype.kind == "O" and not all(
                    isinstance(v, numbers.Real) for v in src.ravel().tolist())):
                raise Lossy(f"not real numbers: {src.dtype}")
            got = (src.astype(np.float64) if rounding and src.dtype.kind == "O" else src).astype(dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise Lossy(repr(exc)) from None
    if not rounding and not all(same_float(a, b) for a, b in zip(src.ravel().tolist(), got.ravel().tolist())):
        raise Lossy(f"{src.ravel().tolist()} is not exactly {dtype}")
    if src.shape == (ne, *item):
        return got
    if ne == 1 and src.shape == tuple(item):
        return got[None]
    raise Lossy(f"shape {src.shape} is not {(ne, *item)}")


def cast(a, dtype):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            return np.asarray(a).astype(dtype)
        except (TypeError, ValueError, OverflowError):
            return np.zeros(np.shape(a), dtype)


def torch_of(a, dtype=None):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if dtype is None else t.to(getattr(torch, dtype))


# "own" / "swapped": the dtype the field is stored as, in native / the other byte order
# (drawn as often as all the other dtypes together: that is where conversions go wrong).
dtypes = st.one_of(st.sampled_from(["own", "swapped"]), st.sampled_from(DTYPES))
NUMERIC = st.one_of(st.sampled_from(["own", "swapped"]), st.sampled_from(DTYPES[:-6]))


def resolve(dtype, own):
    if dtype == "own":
        return np.dtype(own)
    if dtype == "swapped":
        return np.dtype(own).newbyteorder("S")
    return dtype


def array_attacks():
    """Hostile variants of a good (ne, *item) argument: (kind, parameter)."""
    kinds = [
        st.tuples(st.just("dtype"), dtypes),
        st.tuples(st.just("shape"), st.lists(st.integers(0, 8), max_size=4).map(tuple)),
        st.tuples(st.just("huge"), st.sampled_from([(2**31,), (2, 2**40), (10**5, 10**5, 10**5), (2**58, 1)])),
        st.sampled_from([("unbatched", None), ("strided", None), ("fortran", None), ("reversed", None),
                         ("readonly", None), ("broadcast", None), ("list", None), ("nested_list", None)]),
        st.tuples(st.just("junk"), st.sampled_from(JUNK)),
    ]
    if HAVE_TORCH:
        kinds.append(st.tuples(st.just("torch"), st.sampled_from([None, "float64", "float32", "int64", "uint8",
                                                                   "int32", "bool", "float16", "bfloat16"])))
        kinds.append(st.sampled_from([("torch_strided", None), ("torch_grad", None)]))
    return st.one_of(kinds)


def attack(kind, param, good, own):
    if kind == "dtype":
        return cast(good, resolve(param, own))
    if kind == "shape":
        return np.zeros(param, good.dtype)
    if kind == "huge":  # zero strides: any shape, no memory
        return np.broadcast_to(good.reshape(-1)[:1], param)
    if kind == "unbatched":
        return good[0]
    if kind == "strided":  # every other element of a wider array: same values, not contiguous
        return np.repeat(good[..., None], 2, axis=-1)[..., 0]
    if kind == "fortran":
        return np.asfortranarray(good)
    if kind == "reversed":
        return good[::-1] if good.ndim else good
    if kind == "readonly":
        a = good.copy()
        a.flags.writeable = False
        return a
    if kind == "broadcast":
        return np.broadcast_to(good[:1], good.shape) if good.ndim else good
    if kind == "list":
        return good.tolist()
    if kind == "nested_list":
        return [good.tolist()]
    if kind == "junk":
        return param
    if kind == "torch":
        if param == "bfloat16":
            return torch_of(good.astype(np.float32), "bfloat16")
        return torch_of(good, param)
    if kind == "torch_strided":
        return torch_of(np.repeat(good[..., None], 2, axis=-1))[..., 0]  # not contiguous
    if kind == "torch_grad":
        return torch_of(good.astype(np.float32)).requires_grad_(True)
    raise AssertionError(kind)


def scalar_attacks(values):
    """Python scalars, numpy scalars and 0-d arrays of every numeric dtype, lists of scalars."""
    values = st.sampled_from(values)
    return st.one_of(
        st.tuples(st.just("py"), values),
        st.tuples(st.just("np_scalar"), NUMERIC, values),
        st.tuples(st.just("np_0d"), NUMERIC, values),
        st.tuples(st.just("py_list"), values),
    )


def scalar(kind, *param, own, ne=1, item=()):
    if kind == "py":
        return param[0]
    if kind == "py_list":
        return np.full((ne, *item), param[0], object).tolist()
    dtype, v = param
    a = cast(np.array(v, dtype=object if isinstance(v, int) and abs(v) >= 2**63 else None), resolve(dtype, own))
    return a[()] if kind == "np_scalar" else a


FLOATS = [float("nan"), float("inf"), -float("inf"), 1e300, -0.0, 1.5, 3.4e38, 3.5e38, 1e-45]
FLAGS = [0, 1, 2, -1, 0.0, 1.0, True, False]
FIELDS = {  # field: (attacks, what it is stored as, rounding)
    "obs": (array_attacks(), "obs", False),
    "next_obs": (array_attacks(), "obs", False),
    "action": (st.one_of(array_attacks(), scalar_attacks(BIG_INTS + [1.0, True])), "action", False),
    "reward": (st.one_of(array_attacks(), scalar_attacks(FLOATS + [10**400, -(10**400), 2**200, 2**63, 7, True])),
               np.float32, True),
    "terminated": (st.one_of(array_attacks(), scalar_attacks(FLAGS)), np.bool_, False),
    "truncated": (st.one_of(array_attacks(), scalar_attacks(FLAGS)), np.bool_, False),
}
ORDER = ("obs", "action", "reward", "next_obs", "terminated", "truncated")


@pytest.mark.parametrize("field", ORDER)
@FUZZ
@given(setup=setups, data=st.data())
def test_hostile_add(field, setup, data):
    buf, ref, streams = filled(setup)
    how = data.draw(FIELDS[field][0], label=field)
    _, kind, rounding = FIELDS[field]
    own = {"obs": buf.obs_dtype, "action": buf.action_dtype}.get(kind, kind)
    item = {"obs": buf.obs_shape, "action": buf.action_shape}.get(kind, ())
    good = dict(zip(ORDER, streams.step()))
    args = dict(good)
    if how[0] in ("py", "np_scalar", "np_0d", "py_list"):
        args[field] = scalar(*how, own=own, ne=buf.num_envs, item=item)
    else:
        args[field] = attack(*how, good[field], own)
    ok, _ = call(buf.add, **args)
    if ok:  # accepted: it must hold exactly what was given
        try:
            args[field] = stored(args[field], own, item, buf.num_envs, rounding)
        except Lossy as exc:
            pytest.fail(f"add accepted {field}={args[field]!r} that it cannot store as given: {exc}")
        ref.add(*(args[f] for f in ORDER))
    assert_unchanged_and_working(buf, ref, streams)


# Specific expectations (regressions the fuzzing found).
def vector_buffer(**kwargs):
    return ReplayBuffer(10, (3,), obs_dtype=np.float32, seed=0, **kwargs)


OBS = np.arange(3, dtype=np.float32)


@pytest.mark.parametrize("num_envs", [1, 2])
def test_big_endian_reward_and_action_are_converted(num_envs):
    buf = vector_buffer(num_envs=num_envs)
    obs = np.stack([OBS] * num_envs)
    buf.add(obs, np.full(num_envs, 3, ">i8"), np.full(num_envs, 1.0, ">f4"), obs, np.zeros(num_envs, bool),
            np.zeros(num_envs, bool))
    if num_envs == 1:  # 0-d arrays too
        buf.add(OBS, np.array(3, ">i8"), np.array(1.0, ">f4"), OBS, False, False)
    batch = buf.sample(8)
    assert batch.reward.tolist() == [1.0] * 8
    assert batch.action.tolist() == [3] * 8


def test_big_endian_observations_are_rejected_naming_the_byte_order():
    buf = vector_buffer()
    for field in ("obs", "next_obs"):
        args = dict(obs=OBS, action=0, reward=0.0, next_obs=OBS, terminated=False, truncated=False)
        args[field] = OBS.astype(">f4")
        with pytest.raises(TypeError, match="byte order"):
            buf.add(**args)
    assert len(buf) == 0


@pytest.mark.parametrize("field,dtype", [("obs", ">f4"), ("next_obs", ">f4"), ("action", ">i8"),
                                         ("reward", ">f4"), ("ids", ">i8")])
def test_big_endian_outputs_are_rejected_naming_the_byte_order(field, dtype):
    buf = vector_buffer()
    buf.add(OBS, 3, 1.0, OBS, False, False)
    out = buf.empty_batch(4)
    with pytest.raises(TypeError, match="byte order"):
        buf.sample_into(out._replace(**{field: np.zeros(getattr(out, field).shape, dtype)}))


@pytest.mark.parametrize("action", [2**63, -(2**63) - 1, 2**64, 10**30])
def test_python_int_actions_out_of_range_are_value_errors(action):
    buf = vector_buffer()
    with pytest.raises(ValueError):
        buf.add(OBS, action, 0.0, OBS, False, False)
    assert len(buf) == 0


@pytest.mark.parametrize("reward", [10**400, -(10**400)], ids=["1e400", "-1e400"])
def test_rewards_too_large_for_a_double_are_value_errors(reward):
    buf = vector_buffer()
    with pytest.raises(ValueError):
        buf.add(OBS, 0, reward, OBS, False, False)
    assert len(buf) == 0


@pytest.mark.parametrize("action", [300, -129, np.int64(300), np.array(300), [300], np.uint64(2**64 - 1)])
def test_actions_that_do_not_fit_the_action_dtype_are_value_errors_not_wrapped(action):
    buf = vector_buffer(action_dtype=np.int8)
    with pytest.raises(ValueError):
        buf.add(OBS, action, 0.0, OBS, False, False)
    assert len(buf) == 0


def test_nan_and_inf_rewards_are_stored():
    buf = vector_buffer()
    for r in (float("nan"), float("inf"), -float("inf")):
        buf.add(OBS, 0, r, OBS, False, False)
    got = buf.sample(64).reward
    assert np.isnan(got).any() and np.isposinf(got).any() and np.isneginf(got).any()


# ---------------------------------------------------------------- constructor
BASE = dict(capacity=20, obs_shape=(3,), obs_dtype=np.float32)
HOSTILE_KWARGS = {
    "capacity": [0, -1, 1, 2**32, 2**33, 2**63 - 1, 2**63, 2**64, 10**30, 2.5, "5", None, True, np.int64(5),
                 np.uint64(2**64 - 1)],
    "obs_shape": [(), (0,), (-1,), (3, 0), (2**40,), (2**62,), (2**63,), (2**64,), (17592118935808,),
                  (2**32, 2**32), (2**21, 2**21, 2**21), (True,), (3.0,), "abc", None, 3, [3], np.array([3]),
                  ((3,),), (np.int64(3),)],
    "obs_dtype": DTYPES + ["not a dtype", None, [("a", "u1")], ("u1", (2,))],
    "frame_stack": [0, -1, 2, 64, 65, 2**31, 2**63, 2.0, None, True],
    "num_envs": [0, -1, 2, 2**20, 2**20 + 1, 3_000_000, 2**31, 2**63, 1.0, None, True, np.int64(2)],
    "action_shape": [(), (2,), (0,), (-1,), (2**40,), (2**62,), (2**64,), None, "x", [2], (2.0,)],
    "action_dtype": DTYPES + ["not a dtype", None],
    "seed": [None, 0, -1, 2**64 - 1, 2**64, 1.5, "1", True, np.uint64(5)],
    "stack_axis": [0, -1, 1, -2, "0", None, 0.0, np.int64(-1)],
    "frame_reserve": [0, 0.0, -0.5, 64, 64.5, float("nan"), float("inf"), -float("inf"), 1e300, 10**400, "0.1",
                      None, True, np.float32(0.1)],
    "sample_threads": [0, 1, 256, 257, 10_000, 2**31, 2**63, -1, 1.5, None, True],
}
CONSISTENT = [  # hostile values that need a matching obs_shape to get past the first check
    dict(frame_stack=64, obs_shape=(64, 1)), dict(frame_stack=65, obs_shape=(65, 1)),
    dict(frame_stack=2**31, obs_shape=(2**31, 1)), dict(frame_stack=4, obs_shape=(3, 4), stack_axis=-1),
    dict(frame_stack=4, obs_shape=(4,), stack_axis=0), dict(capacity=2**20, obs_shape=(17592118935808,),
                                                           frame_reserve=0.0),
    dict(capacity=2**20, obs_shape=(2**43,), obs_dtype=np.float64, frame_reserve=0.0),
    dict(capacity=2**31, obs_shape=(2**33,), obs_dtype=np.uint8), dict(num_envs=3_000_000, capacity=4_000_000),
    dict(capacity=2**32 - 1, obs_shape=(1,), obs_dtype=np.uint8, frame_reserve=64.0),
]
hostile_kwargs = st.one_of(
    st.sampled_from(CONSISTENT),
    st.sampled_from(sorted(HOSTILE_KWARGS)).flatmap(lambda k: st.sampled_from(HOSTILE_KWARGS[k]).map(lambda v: {k: v})),
)


@FUZZ
@given(hostile_kwargs, st.sampled_from([{}, {"num_envs": 2}, {"action_shape": (2,)}]))
def test_hostile_constructor(kwargs, extra):
    kw = {**BASE, **extra, **kwargs}
    ok, buf = call(ReplayBuffer, **kw)
    if not ok:
        return
    # It stands: its memory must really hold capacity transitions (a wrapped size would not) ...
    frame_bytes = int(np.prod(buf.frame_shape, dtype=object)) * buf.obs_dtype.itemsize
    assert buf.frame_capacity >= buf.capacity
    assert buf.nbytes >= buf.frame_capacity * frame_bytes + buf.capacity * buf.action_dtype.itemsize
    assert buf.obs_dtype.isnative and buf.action_dtype.isnative, "a byte-swapped dtype stores raw bytes"
    assert len(buf) == 0 and buf.total_adds == 0 and repr(buf)
    # ... and it must work: a good add comes back exactly.
    ne = buf.num_envs
    obs_bytes = ne * int(np.prod(buf.obs_shape, dtype=object)) * buf.obs_dtype.itemsize
    if obs_bytes > 1 << 20:
        return
    obs = np.ones((ne, *buf.obs_shape), buf.obs_dtype)
    args = (obs, np.ones((ne, *buf.action_shape), buf.action_dtype), np.full(ne, 0.5, np.float32), np.zeros_like(obs),
            np.ones(ne, bool), np.zeros(ne, bool))
    ref = ReferenceReplay(buf.capacity)
    ref.add(*args)
    buf.add(*args)
    assert_holds(buf, ref)


def test_frame_bytes_that_wrap_2_64_fail_at_construction():
    # (2**20 + 4) frames x 17592118935808 bytes wraps to 1 KiB: the first add wrote past it (a crash).
    with pytest.raises((MemoryError, ValueError)):
        ReplayBuffer(2**20, (17592118935808,), frame_reserve=0.0)


def test_constructor_bounds():
    with pytest.raises(ValueError):
        ReplayBuffer(4_000_000, (1,), num_envs=3_000_000)  # the bound is 2**20
    with pytest.raises(ValueError):
        ReplayBuffer(20, (1,), sample_threads=10_000)  # the bound is 256
    with pytest.raises(TypeError, match="byte order"):
        ReplayBuffer(20, (3,), obs_dtype=">f4")


# ---------------------------------------------------------------- sampling
@FUZZ
# No batch size a machine could allocate and then fill (2**31, 2**40 under overcommit): the test would swap.
@given(setups, st.sampled_from([0, -1, 1, 3, 64, 2**62, 2**63, 2**64, 10**30, 2.0, "4", None, True, np.int64(5),
                                np.uint8(2), np.float64(4), [4], np.array([4])] + [2**56]),
       st.sampled_from([False, True, 0, 1, None, "yes", np.bool_(True), [], np.array([True, False])]))
def test_hostile_sample_and_empty_batch(setup, batch_size, window):
    buf, ref, streams = filled(setup)
    for fn in (buf.sample, buf.empty_batch):
        ok, batch = call(fn, batch_size, window)
        if ok:
            n = int(batch_size)
            assert len(batch.ids) == n and len(batch.obs) == n
            if fn == buf.sample:
                assert_same(*(getattr(batch, n) for n in SAME), ref, ref.ring_ids())
            elif bool(window):  # window mode: obs and next_obs are views of frames
                assert batch.frames is not None and np.shares_memory(batch.obs, batch.frames)
    assert_unchanged_and_working(buf, ref, streams)


def out_attacks():
    kinds = [
        st.tuples(st.just("dtype"), dtypes),
        st.tuples(st.just("shape"), st.sampled_from(["batch+1", "batch-1", "extra", "missing", "empty", "scalar"])),
        st.sampled_from([("strided",), ("fortran",), ("readonly",), ("broadcast",), ("alias",), ("list",)]),
        st.tuples(st.just("junk"), st.sampled_from(JUNK)),
    ]
    if HAVE_TORCH:
        kinds.append(st.tuples(st.just("torch"), st.sampled_from([None, "float64", "int32", "uint8", "bool",
                                                                  "bfloat16", "meta", "strided", "neg", "grad"])))
    return st.one_of(kinds)


def out_attack(kind, base, out, name, *param):
    """A hostile replacement for out.<name>, shaped after the numpy twin `base`."""
    a = getattr(base, name)
    if kind == "dtype":
        return np.zeros(a.shape, resolve(param[0], a.dtype))
    if kind == "shape":
        s = a.shape
        shape = {"batch+1": (s[0] + 1, *s[1:]), "batch-1": (s[0] - 1, *s[1:]), "extra": (*s, 1),
                 "missing": s[:-1], "empty": (0, *s[1:]), "scalar": ()}[param[0]]
        return np.zeros(shape, a.dtype)
    if kind == "strided":
        return np.zeros((*a.shape, 2), a.dtype)[..., 0]
    if kind == "fortran":
        return np.asfortranarray(np.zeros(a.shape, a.dtype))
    if kind == "readonly":
        r = np.zeros(a.shape, a.dtype)
        r.flags.writeable = False
        return r
    if kind == "broadcast":
        return np.broadcast_to(np.zeros(a.shape[1:], a.dtype), a.shape)
    if kind == "alias":  # right dtype and shape, inside another field's memory
        mine = to_np(getattr(out, name)) if getattr(out, name) is not None else None
        others = [to_np(x) for n, x in zip(out._fields, out) if n != name and x is not None]
        others = [o for o in others if mine is None or not np.shares_memory(o, mine)]
        big = max(others, key=lambda o: o.nbytes)
        if big.nbytes < a.nbytes:
            return np.zeros(a.shape, a.dtype)
        return big.reshape(-1).view(np.uint8)[: a.nbytes].view(a.dtype).reshape(a.shape)
    if kind == "list":
        return np.zeros(a.shape, a.dtype).tolist()
    if kind == "junk":
        return param[0]
    import torch

    p = param[0]
    t = torch.from_numpy(np.zeros(a.shape, a.dtype))
    if p in (None, "float64", "int32", "uint8", "bool", "bfloat16"):
        return t if p is None else t.to(getattr(torch, p))
    if p == "meta":
        return t.to("meta")
    if p == "strided":
        return torch.from_numpy(np.zeros((*a.shape, 2), a.dtype))[..., 0]
    if p == "grad":
        return t.float().requires_grad_(True) if t.is_floating_point() else t
    if p == "neg":  # a tensor with torch's lazy negation bit
        return torch.zeros(a.shape, dtype=torch.complex64).conj().imag if a.dtype == np.float32 else t
    raise AssertionError(p)


@FUZZ
@given(setups, st.sampled_from([1, 4]), st.booleans(), st.booleans(),
       st.sampled_from(["obs", "next_obs", "frames", "action", "reward", "terminated", "truncated", "ids"]),
       out_attacks())
def test_hostile_sample_into(setup, batch_size, window, as_torch, name, how):
    if as_torch and not HAVE_TORCH:
        return
    buf, ref, streams = filled(setup)
    out = buf.empty_batch(batch_size, window, torch=as_torch)
    if getattr(out, name) is None:
        name = "obs"
    base = buf.empty_batch(batch_size, window)  # numpy twin to derive hostile arrays from
    out = out._replace(**{name: out_attack(how[0], base, out, name, *how[1:])})
    for _ in range(2):  # twice: the second call may take sample_into's cached path
        ok, _ = call(buf.sample_into, out)
        if ok:
            skip = ("obs", "next_obs") if out.frames is not None else ("frames",)  # fields sample_into ignores
            fields = {n: to_np(getattr(out, n)) for n in out._fields if n not in skip}
            if out.frames is not None:  # window mode writes frames only; obs/next_obs are its views
                f, k = fields["frames"], buf.frame_stack
                if k == 1:
                    fields["obs"], fields["next_obs"] = f[:, 0], f[:, 1]
                elif buf.stack_last:
                    fields["obs"], fields["next_obs"] = f[..., :k], f[..., 1:]
                else:
                    fields["obs"], fields["next_obs"] = f[:, :k], f[:, 1:]
            assert_same(*(fields[n] for n in SAME), ref, ref.ring_ids())
    assert_unchanged_and_working(buf, ref, streams)


@pytest.mark.parametrize("out", [None, (), [], {}, "batch", 3])
def test_sample_into_something_that_is_not_a_batch_is_a_type_error(out):
    buf, ref, streams = filled(SETUPS[2])
    with pytest.raises(TypeError):
        buf.sample_into(out)
    with pytest.raises(TypeError):
        buf.sample_into(tuple(buf.empty_batch(4)))  # the right fields, but a plain tuple
    assert_unchanged_and_working(buf, ref, streams)


def test_torch_outputs_that_numpy_cannot_view_are_type_errors():
    torch = pytest.importorskip("torch")
    buf, ref, streams = filled(SETUPS[2])
    out = buf.empty_batch(4, torch=True)
    neg = torch.zeros(4, dtype=torch.complex64).conj().imag  # float32, with torch's negation bit
    for bad in (neg, torch.zeros(4, device="meta"), torch.zeros(4).to_sparse(), torch.zeros(4, dtype=torch.bfloat16)):
        with pytest.raises(TypeError):
            buf.sample_into(out._replace(reward=bad))
    assert_unchanged_and_working(buf, ref, streams)


def test_empty_batch_too_large_for_memory_is_a_memory_error():
    buf, _, _ = filled(SETUPS[2])
    with pytest.raises((MemoryError, ValueError)):
        buf.empty_batch(2**56)  # 2**59 bytes of ids: more than any address space
    if HAVE_TORCH:
        for size in (2**56, 2**62):  # torch: a failed allocation, then a size it cannot even compute
            with pytest.raises((MemoryError, ValueError)):
                buf.empty_batch(size, torch=True)


# ---------------------------------------------------------------- save / load
@FUZZ
@given(setups, st.sampled_from(["dir", "missing_dir", "nul", "empty_file", "garbage", "truncated", "flipped",
                                "none", "int", "bytes_path", "good"]))
def test_hostile_save_and_load(tmp_path_factory, setup, how):
    buf, ref, streams = filled(setup)
    d = tmp_path_factory.mktemp("f")
    good = d / "good.bin"
    buf.save(good)
    data = good.read_bytes()
    path = {"dir": d, "missing_dir": d / "no" / "such", "nul": "a\0b", "none": None, "int": 3,
            "bytes_path": os.fsencode(d / "b.bin")}.get(how, d / f"{how}.bin")
    if how in ("empty_file", "garbage", "truncated", "flipped"):
        path.write_bytes({"empty_file": b"", "garbage": np.random.default_rng(0).bytes(len(data)), "truncated": data[: len(data) // 2],
                          "flipped": data[:-40] + bytes([data[-40] ^ 1]) + data[-39:]}[how])
    elif how == "good":
        path = good
    else:  # saving to hostile paths: allowed errors (or OSError from the file system), nothing else
        try:
            ok, _ = call(buf.save, path)
        except OSError:
            ok = False
        if ok:
            path = os.fsdecode(path)
    try:
        ok, loaded = call(ReplayBuffer.load, path)
    except OSError:
        ok = False
    if how in ("empty_file", "garbage", "truncated", "flipped"):
        assert not ok, f"loaded a {how} file"
        with pytest.raises(ReplayFileError):
            ReplayBuffer.load(path)
    if ok:
        assert_holds(loaded, ref)
    assert_unchanged_and_working(buf, ref, streams)
