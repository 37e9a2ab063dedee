"""n-step returns: the native buffer against the pure-Python reference.

Every stored id is read back with ``get`` (and a few with ``sample``) and
compared field by field with ``ReferenceReplay.nstep``, which follows the
issue's rule one transition at a time: the window of transition t of env e is
t, t + num_envs, ... up to n of them, ending (inclusive) at a terminated or
truncated transition, before a stream break, or at env e's newest add.

DQN_FAST_FUZZ_EXAMPLES scales the hypothesis examples (a fifth of it per test,
fewer under sanitizers).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dqn_fast import ReplayBuffer
from dqn_fast.replay import window_next_obs
from reference import (EpisodeStreams, ReferenceReplay, StreamConfig, assert_batch_matches, assert_nstep_batch_matches,
                       compression_kwargs)

EXAMPLES = max(5, int(os.environ.get("DQN_FAST_FUZZ_EXAMPLES", "200")) // 5)
compressions = st.sampled_from([None, "lz4", "zstd"])
arena_room = st.one_of(st.none(), st.integers(0, 30))  # None: the default arena; else a tight one
PROPERTY = settings(deadline=None, max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])


def obs_shape_of(cfg: StreamConfig) -> tuple:
    if cfg.frame_stack == 1:
        return cfg.frame_shape
    if cfg.stack_axis == -1:
        return (*cfg.frame_shape, cfg.frame_stack)
    return (cfg.frame_stack, *cfg.frame_shape)


def make_buffer(cfg: StreamConfig, capacity: int, seed: int = 0, **kw) -> ReplayBuffer:
    return ReplayBuffer(
        capacity, obs_shape_of(cfg), obs_dtype=cfg.dtype, frame_stack=cfg.frame_stack, num_envs=cfg.num_envs,
        action_shape=cfg.action_shape, seed=seed, stack_axis=cfg.stack_axis, **kw,
    )


def live_ids(buf) -> np.ndarray:
    """The stored ids: the most recent len(buf) adds (early eviction included)."""
    return np.arange(buf.total_adds - len(buf), buf.total_adds, dtype=np.int64)


def feed(buf, ref, streams, adds, on_step=None):
    for step in range(adds):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
        if on_step is not None:
            on_step(step)


def frames_of(obs: np.ndarray, k: int, stack_last: bool) -> list:
    if k == 1:
        return [obs]
    return [np.take(obs, j, axis=-1 if stack_last else 0) for j in range(k)]


def expected_window_row(ref: ReferenceReplay, tid: int, n: int, k: int, stack_last: bool) -> tuple:
    """(frames row, next_start) of `tid` in window mode: obs's k frames, then the newest
    frame of each window transition's next_obs, then zeros up to k + n frames."""
    ids = ref.window(tid, n)
    row = frames_of(ref.transitions[tid][0], k, stack_last)
    row += [frames_of(ref.transitions[i][3], k, stack_last)[-1] for i in ids]
    row += [np.zeros_like(row[0])] * (n - len(ids))
    return np.stack(row, axis=-1 if stack_last else 0), len(ids)


def check_window_batch(batch, ref, ids, n, gamma, cfg, live):
    k, stack_last = cfg.frame_stack, cfg.stack_axis == -1 and cfg.frame_stack > 1
    frames, next_start = np.asarray(batch.frames), np.asarray(batch.next_start)
    assert next_start.dtype == np.int64 and next_start.shape == (len(ids),), (next_start.dtype, next_start.shape)
    frame_shape = cfg.frame_shape
    want_shape = (len(ids), *frame_shape, k + n) if stack_last else (len(ids), k + n, *frame_shape)
    assert frames.shape == want_shape, f"frames shape {frames.shape}, expected {want_shape}"
    for b, tid in enumerate(np.asarray(ids).tolist()):
        row, m = expected_window_row(ref, tid, n, k, stack_last)
        assert next_start[b] == m, f"next_start of id {tid}: expected {m} (window {ref.window(tid, n)}), got {next_start[b]}"
        np.testing.assert_array_equal(frames[b], row, err_msg=f"window frames of id {tid} (window {ref.window(tid, n)})")
    assert np.asarray(batch.obs).shape == (len(ids), *obs_shape_of(cfg))
    rebuilt = np.asarray(window_next_obs(frames, next_start, k, stack_last=stack_last))
    assert rebuilt.shape == np.asarray(batch.obs).shape, f"window_next_obs gave {rebuilt.shape}, obs is {np.asarray(batch.obs).shape}"
    if n == 1:  # as today: a view of the frames
        np.testing.assert_array_equal(np.asarray(batch.next_obs), rebuilt)
    else:
        assert batch.next_obs is None, "window mode with n_step > 1 leaves next_obs to window_next_obs"
    assert_nstep_batch_matches(batch._replace(next_obs=rebuilt), ref, n, gamma, live)


stream_configs = st.builds(
    StreamConfig,
    num_envs=st.integers(1, 3),
    frame_stack=st.integers(1, 4),
    frame_shape=st.sampled_from([(2, 3), (3,)]),
    dtype=st.sampled_from([np.uint8, np.float32]),
    stack_axis=st.sampled_from([0, -1]),
    min_len=st.integers(1, 2),  # episodes shorter than n and k are common
    max_len=st.integers(2, 12),
    padding=st.sampled_from(["repeat", "zero", "random"]),
    palette=st.integers(1, 4),
    p_glitch=st.sampled_from([0.0, 0.15, 0.3]),  # stream breaks
    p_jump=st.sampled_from([0.0, 0.0, 0.15]),
    action_shape=st.sampled_from([(), (2,)]),
    drift=st.sampled_from([0.0, 0.05, 0.3]),
)
gammas = st.one_of(st.sampled_from([0.0, 0.5, 0.99, 1.0]), st.floats(0.0, 1.0))


@PROPERTY
@given(cfg=stream_configs, capacity=st.integers(3, 40), adds=st.integers(1, 60), n=st.integers(1, 4),
       gamma=gammas, seed=st.integers(0, 2**16), compression=compressions, room=arena_room)
def test_every_stored_id_equals_the_reference(cfg, capacity, adds, n, gamma, seed, compression, room):
    capacity = max(capacity, cfg.num_envs)
    kw = compression_kwargs(cfg, compression, room)
    buf, ref = make_buffer(cfg, capacity, seed, n_step=n, gamma=gamma, **kw), ReferenceReplay(capacity)
    assert buf.n_step == n and buf.gamma == gamma

    def check(step):
        if step % 5 == 4 or step == adds - 1:  # windows change as adds arrive: check along the way
            live = live_ids(buf)
            assert len(live) > 0
            batch = buf.get(live)
            np.testing.assert_array_equal(np.asarray(batch.ids), live)
            assert_nstep_batch_matches(batch, ref, n, gamma, range(live[0], live[-1] + 1))
            assert_nstep_batch_matches(buf.sample(8), ref, n, gamma, range(live[0], live[-1] + 1))

    feed(buf, ref, EpisodeStreams(cfg, seed), adds, check)


@PROPERTY
@given(cfg=stream_configs, capacity=st.integers(3, 40), adds=st.integers(1, 50), n=st.integers(1, 4),
       gamma=gammas, seed=st.integers(0, 2**16), compression=compressions, room=arena_room)
def test_window_mode_equals_the_reference(cfg, capacity, adds, n, gamma, seed, compression, room):
    cfg.p_jump = 0.0  # a window only holds transitions whose next_obs is obs shifted by a frame
    capacity = max(capacity, cfg.num_envs)
    kw = compression_kwargs(cfg, compression, room)
    buf, ref = make_buffer(cfg, capacity, seed, n_step=n, gamma=gamma, **kw), ReferenceReplay(capacity)

    def check(step):
        if step % 5 == 4 or step == adds - 1:
            live = live_ids(buf)
            stored = range(live[0], live[-1] + 1)
            check_window_batch(buf.get(live, window=True), ref, live, n, gamma, cfg, stored)
            sampled = buf.sample(8, window=True)
            check_window_batch(sampled, ref, np.asarray(sampled.ids), n, gamma, cfg, stored)
            out = buf.empty_batch(len(live), window=True)
            assert buf.get_into(live, out) is out
            check_window_batch(out, ref, live, n, gamma, cfg, stored)

    feed(buf, ref, EpisodeStreams(cfg, seed), adds, check)


def test_hand_written_windows_follow_the_issue():
    # One env, n=3, gamma=0.5, vector obs (k=1) so the stream is easy to read:
    #   ids 0,1,2: an episode that terminates at 2 (windows stop there, inclusive)
    #   ids 3,4:   a new episode truncated at 4
    #   id 5:      obs continues nothing (after a truncation); 6 continues 5
    #   id 7:      obs does not equal 6's next_obs: a break, 6's window ends at 6
    #   id 8:      continues 7 and is the newest: 7's window is [7, 8]
    o = lambda v: np.array([v], dtype=np.float32)
    steps = [(0, 1, False, False), (1, 2, False, False), (2, 3, True, False), (10, 11, False, False),
             (11, 12, False, True), (20, 21, False, False), (21, 22, False, False), (30, 31, False, False),
             (31, 32, False, False)]
    buf = ReplayBuffer(100, (1,), np.float32, n_step=3, gamma=0.5, seed=0)
    ref = ReferenceReplay(100)
    for i, (a, b, term, trunc) in enumerate(steps):
        args = (o(a)[None], np.array([i]), np.array([2.0**i], np.float32), o(b)[None], np.array([term]), np.array([trunc]))
        ref.add(*args)
        buf.add(*args)
    want = {0: [0, 1, 2], 1: [1, 2], 2: [2], 3: [3, 4], 4: [4], 5: [5, 6], 6: [6], 7: [7, 8], 8: [8]}
    assert {t: ref.window(t, 3) for t in want} == want  # the reference reads the issue this way
    batch = buf.get(np.arange(9))
    assert_nstep_batch_matches(batch, ref, 3, 0.5)
    # Spelled out for id 0: 1 + 0.5*2 + 0.25*4, discount 0.5**3, next_obs and flags of id 2.
    assert batch.reward[0] == 3.0 and batch.discount[0] == np.float32(0.125)
    assert batch.next_obs[0][0] == 3 and batch.terminated[0] and not batch.truncated[0]
    # A window cut by a break or by the newest add keeps its (false) flags: the learner bootstraps.
    assert not batch.terminated[6] and not batch.truncated[6] and batch.discount[6] == np.float32(0.5)
    assert batch.next_obs[7][0] == 32 and batch.discount[7] == np.float32(0.25)


def test_the_newest_transitions_windows_grow_as_adds_arrive():
    cfg = StreamConfig(num_envs=2, frame_stack=4, frame_shape=(3, 3), min_len=50, max_len=60, palette=256)
    buf, ref, streams = make_buffer(cfg, 100, n_step=4, gamma=0.9), ReferenceReplay(100), EpisodeStreams(cfg, 1)
    feed(buf, ref, streams, 1)
    lengths = []
    for _ in range(4):
        lengths.append(float(buf.get(np.array([0])).discount[0]))
        feed(buf, ref, streams, 1)
        assert_nstep_batch_matches(buf.get(live_ids(buf)), ref, 4, 0.9)
    np.testing.assert_allclose(lengths, [0.9, 0.81, 0.729, 0.6561], rtol=1e-6)  # m = 1, 2, 3, 4


def test_a_long_wrapped_ring_with_several_envs():
    # Many wraps and evictions; the ids at the ring's tail and head both get checked.
    cfg = StreamConfig(num_envs=3, frame_stack=4, frame_shape=(4, 4), min_len=1, max_len=9, padding="zero",
                       palette=3, p_glitch=0.05, p_jump=0.05)
    buf, ref = make_buffer(cfg, 50, seed=3, n_step=3, gamma=0.97), ReferenceReplay(50)

    def check(step):
        if step % 37 == 0:
            live = live_ids(buf)
            assert_nstep_batch_matches(buf.get(live), ref, 3, 0.97, range(live[0], live[-1] + 1))

    feed(buf, ref, EpisodeStreams(cfg, 5), 600, check)
    assert buf.total_adds == 1800 and len(buf) <= 50


@pytest.mark.parametrize("window", [False, True])
def test_n_step_1_is_todays_buffer_with_discount_gamma(window):
    cfg = StreamConfig(num_envs=2, frame_stack=4, frame_shape=(3, 4), min_len=1, max_len=15, palette=3, p_glitch=0.1)
    old, new = make_buffer(cfg, 60, seed=11), make_buffer(cfg, 60, seed=11, n_step=1, gamma=0.9)
    ref, streams = ReferenceReplay(60), EpisodeStreams(cfg, 2)
    for _ in range(150):
        args = streams.step()
        for b in (old, new, ref):
            b.add(*args)
        a, b = old.sample(16, window=window), new.sample(16, window=window)
        for name in ("obs", "action", "reward", "next_obs", "terminated", "truncated", "ids", "frames"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                np.testing.assert_array_equal(x, y, err_msg=name)
        assert_batch_matches(b, ref, ref.ring_ids())
        assert (b.discount == np.float32(0.9)).all() and (b.weights == 1).all()
        assert (a.discount == np.float32(0.99)).all()  # the default gamma
        if window:
            assert (b.next_start == 1).all()


def test_sample_into_fills_discount_and_weights_in_torch_outputs():
    torch = pytest.importorskip("torch")
    cfg = StreamConfig(num_envs=2, frame_stack=4, frame_shape=(3, 3), min_len=2, max_len=8, palette=4)
    buf, ref = make_buffer(cfg, 80, seed=1, n_step=3, gamma=0.8), ReferenceReplay(80)
    feed(buf, ref, EpisodeStreams(cfg, 4), 60)
    for window in (False, True):
        out = buf.empty_batch(32, window=window, torch=True)
        assert out.discount.dtype == torch.float32 and out.weights.dtype == torch.float32
        out.discount.fill_(-1)
        out.weights.fill_(-1)
        buf.sample_into(out)
        if window:
            out = out._replace(next_obs=window_next_obs(out.frames, out.next_start, 4))
            assert isinstance(out.next_obs, torch.Tensor)
        assert_nstep_batch_matches(out, ref, 3, 0.8, live_ids(buf).tolist())


def test_get_names_the_first_id_that_is_not_stored():
    cfg = StreamConfig(num_envs=2, frame_stack=2, frame_shape=(3,), min_len=3, max_len=9)
    buf, ref = make_buffer(cfg, 10, n_step=2), ReferenceReplay(10)
    with pytest.raises(ValueError, match=r"\b0\b"):
        buf.get(np.array([0]))  # empty: nothing is stored
    feed(buf, ref, EpisodeStreams(cfg, 0), 20)  # ids 30..39 stored, 0..29 evicted
    live = live_ids(buf)
    assert live[0] > 0
    for bad in (live[0] - 1, 0, buf.total_adds, buf.total_adds + 5, -1, 2**62):
        for ids in ([bad], [live[0], bad, live[-1]], [live[-1], bad, bad - 1 if bad > 0 else 7 * bad]):
            with pytest.raises(ValueError, match=rf"(?<![\d-]){bad}(?!\d)"):
                buf.get(np.array(ids, dtype=np.int64))
    with pytest.raises(ValueError, match=rf"(?<![\d-]){live[0] - 1}(?!\d)"):
        buf.get_into(np.array([live[0], live[0] - 1, live[1]]), buf.empty_batch(3))
    assert_nstep_batch_matches(buf.get(live), ref, 2, 0.99)  # the rejected calls changed nothing


def test_get_checks_its_arguments():
    cfg = StreamConfig(num_envs=1, frame_stack=1, frame_shape=(3,))
    buf, ref = make_buffer(cfg, 10, n_step=2), ReferenceReplay(10)
    feed(buf, ref, EpisodeStreams(cfg, 0), 6)
    for bad in (np.array([1.0, 2.0]), np.array(["1"]), "1", None, object()):
        with pytest.raises(TypeError):
            buf.get(bad)
    with pytest.raises(ValueError, match="ids"):
        buf.get(np.array([[1, 2]]))  # 2-D
    for empty in ([], np.array([], np.int64)):
        with pytest.raises(ValueError, match="ids is empty"):
            buf.get(empty)
    with pytest.raises(ValueError):
        buf.get_into(np.arange(4), buf.empty_batch(3))  # batch size differs from len(ids)
    with pytest.raises(TypeError):
        buf.get_into(np.arange(3), "out")
    # Ids from a torch batch work as numpy ones do.
    np.testing.assert_array_equal(buf.get(np.array([3, 1])).ids, [3, 1])
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(buf.get(torch.tensor([5, 0])).ids, [5, 0])


@pytest.mark.parametrize("bad", [0, -1, -(2**63), 10**6])
def test_n_step_out_of_range_is_a_value_error(bad):
    with pytest.raises(ValueError, match="n_step"):
        ReplayBuffer(10, (2,), np.float32, n_step=bad)


@pytest.mark.parametrize("bad", [1.5, 3.0, "3", True, None, np.float64(2)])
def test_n_step_of_the_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="n_step"):
        ReplayBuffer(10, (2,), np.float32, n_step=bad)


@pytest.mark.parametrize("bad", [-1e-9, 1.0000001, -1.0, 2.0, math.nan, math.inf, -math.inf])
def test_gamma_outside_0_1_is_a_value_error(bad):
    with pytest.raises(ValueError, match="gamma"):
        ReplayBuffer(10, (2,), np.float32, n_step=3, gamma=bad)


@pytest.mark.parametrize("bad", ["0.9", None, [0.9], 1j])
def test_gamma_of_the_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="gamma"):
        ReplayBuffer(10, (2,), np.float32, n_step=3, gamma=bad)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 1, np.float32(0.9)])
def test_gamma_at_the_bounds_and_numeric_types_are_accepted(gamma):
    buf = ReplayBuffer(10, (2,), np.float32, n_step=3, gamma=gamma)
    assert buf.gamma == float(gamma)
