"""Replay semantics: the native buffer against the pure-Python reference."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dqn_fast import ReplayBuffer
from reference import EpisodeStreams, ReferenceReplay, StreamConfig, assert_batch_matches, compression_kwargs


def make_buffer(cfg: StreamConfig, capacity: int, seed: int = 0, **kw) -> ReplayBuffer:
    if cfg.frame_stack == 1:
        obs_shape = cfg.frame_shape
    elif cfg.stack_axis == -1:
        obs_shape = (*cfg.frame_shape, cfg.frame_stack)
    else:
        obs_shape = (cfg.frame_stack, *cfg.frame_shape)
    return ReplayBuffer(
        capacity,
        obs_shape,
        obs_dtype=cfg.dtype,
        frame_stack=cfg.frame_stack,
        num_envs=cfg.num_envs,
        action_shape=cfg.action_shape,
        seed=seed,
        stack_axis=cfg.stack_axis,
        **kw,
    )


def run(cfg, capacity, adds, seed=0, check_every=1, batch=16, window=False, **kw):
    """Feed the same stream to both buffers, checking samples as it goes."""
    streams = EpisodeStreams(cfg, seed)
    buf = make_buffer(cfg, capacity, seed, **kw)
    ref = ReferenceReplay(capacity)
    for step in range(adds):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
        assert buf.total_adds == ref.next_id
        assert len(buf) <= min(ref.next_id, capacity)
        if step % check_every == 0:
            live = range(ref.next_id - len(buf), ref.next_id)
            assert_batch_matches(buf.sample(batch), ref, live)
            if window:
                assert_batch_matches(buf.sample(batch, window=True), ref, live)
    return buf, ref, streams


stream_configs = st.builds(
    StreamConfig,
    num_envs=st.integers(1, 3),
    frame_stack=st.integers(1, 4),
    dtype=st.sampled_from([np.uint8, np.float32]),
    stack_axis=st.sampled_from([0, -1]),
    min_len=st.integers(1, 3),
    max_len=st.integers(3, 25),
    padding=st.sampled_from(["repeat", "zero", "random"]),
    palette=st.integers(1, 5),
    p_glitch=st.sampled_from([0.0, 0.0, 0.1]),
    p_jump=st.sampled_from([0.0, 0.0, 0.1]),
    action_shape=st.sampled_from([(), (2,)]),
    drift=st.sampled_from([0.0, 0.05, 0.3]),
)


# Compressed frame stores must keep every semantic above; a tight arena (a
# few frames over the minimum) fills before the ring and evicts by bytes.
compressions = st.sampled_from([None, "lz4", "zstd"])
arena_room = st.one_of(st.none(), st.integers(0, 40))


@settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=stream_configs, capacity=st.integers(3, 60), adds=st.integers(1, 150), seed=st.integers(0, 2**16),
       compression=compressions, room=arena_room)
def test_samples_equal_reference(cfg, capacity, adds, seed, compression, room):
    capacity = max(capacity, cfg.num_envs)
    run(cfg, capacity, adds, seed, check_every=3, batch=12, **compression_kwargs(cfg, compression, room))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=stream_configs, capacity=st.integers(4, 40), seed=st.integers(0, 2**16), compression=compressions,
       room=arena_room)
def test_window_output_equals_reference(cfg, capacity, seed, compression, room):
    cfg.p_jump = 0.0  # a window can only hold shift-consistent transitions
    capacity = max(capacity, cfg.num_envs)
    run(cfg, capacity, 80, seed, check_every=4, batch=8, window=True, **compression_kwargs(cfg, compression, room))


@pytest.mark.parametrize("compression", [None, "lz4"])
@pytest.mark.parametrize("padding", ["repeat", "zero"])
@pytest.mark.parametrize("num_envs", [1, 3])
def test_long_episodes_fill_exactly_capacity_through_many_wraps(padding, num_envs, compression):
    cfg = StreamConfig(num_envs=num_envs, frame_stack=4, padding=padding, min_len=50, max_len=200, palette=256)
    capacity = 600
    kw = compression_kwargs(cfg, compression, 2 * capacity)  # random frames do not code: an arena of raw size
    buf, ref, _ = run(cfg, capacity, adds=3000 // num_envs, check_every=97, batch=64, **kw)
    # With the default reserve, episodes of 50+ steps never force early eviction.
    assert len(buf) == min(ref.next_id, capacity)
    assert ref.next_id > 4 * capacity


def test_ring_keeps_the_most_recent_adds_at_every_step():
    cfg = StreamConfig(num_envs=2, frame_stack=4, min_len=30, max_len=60, palette=256)
    streams, capacity = EpisodeStreams(cfg, 3), 50
    buf, ref = make_buffer(cfg, capacity), ReferenceReplay(capacity)
    for _ in range(400):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
        assert len(buf) == min(ref.next_id, capacity)
        batch = buf.sample(256)
        assert set(batch.ids.tolist()) <= set(ref.ring_ids())


def segments(ref: ReferenceReplay, num_envs: int) -> int:
    """Episode segments in the stream: first transition of an env, or after an end."""
    count, ended = 0, [True] * num_envs
    for tid in range(ref.next_id):
        *_, term, trunc = ref.transitions[tid]
        count += ended[tid % num_envs]
        ended[tid % num_envs] = term or trunc
    return count


@pytest.mark.parametrize("padding,start_frames", [("repeat", 1), ("zero", 2)])
def test_each_frame_is_stored_once(padding, start_frames):
    # A segment start stores its distinct frames (1 with reset padding, 2 with
    # zero padding); every step after that stores exactly one new frame.
    cfg = StreamConfig(num_envs=2, frame_stack=4, padding=padding, min_len=5, max_len=40, palette=256)
    buf, ref, _ = run(cfg, 10_000, adds=500, check_every=50)
    assert buf.frames_written == ref.next_id + start_frames * segments(ref, cfg.num_envs)


def test_vector_observations_store_one_obs_per_step_plus_one_per_episode():
    cfg = StreamConfig(num_envs=3, frame_stack=1, frame_shape=(4,), dtype=np.float32, min_len=3, max_len=30, palette=1000)
    buf, ref, _ = run(cfg, 5000, adds=400, check_every=40)
    assert buf.frames_written == ref.next_id + segments(ref, cfg.num_envs)


def test_short_episodes_evict_early_and_len_says_so():
    # Arbitrary padding and one-step episodes need 2k frames per transition:
    # far more than the reserve, so the oldest transitions go early.
    cfg = StreamConfig(frame_stack=4, padding="random", min_len=1, max_len=1, palette=256)
    buf, ref, _ = run(cfg, 100, adds=500, check_every=7)
    assert 0 < len(buf) < 100
    assert buf.frames_written > buf.frame_capacity  # the frame ring wrapped


def test_surprising_streams_cost_memory_not_correctness():
    cfg = StreamConfig(num_envs=2, frame_stack=4, p_glitch=0.3, p_jump=0.3, palette=3, max_len=8)
    run(cfg, 40, adds=400, check_every=1, batch=32)


def test_window_rejects_transitions_it_cannot_hold():
    cfg = StreamConfig(frame_stack=4, p_jump=1.0, palette=256)
    buf, ref, _ = run(cfg, 50, adds=10)
    before = buf.sample(8).ids  # seeded draw sequence ...
    with pytest.raises(ValueError, match="window=False"):
        buf.sample(4, window=True)
    buf2, _, _ = run(cfg, 50, adds=10)
    buf2.sample(8)
    assert np.array_equal(buf.sample(8).ids, buf2.sample(8).ids)  # ... is untouched by the rejected call
    assert before is not None


def test_channel_last_stacks_round_trip():
    cfg = StreamConfig(num_envs=2, frame_stack=3, stack_axis=-1, frame_shape=(4, 5), palette=3)
    buf, ref, _ = run(cfg, 64, adds=200, check_every=5, window=True)
    w = buf.sample(4, window=True)
    assert w.frames.shape == (4, 4, 5, 4) and w.obs.shape == (4, 4, 5, 3)


def test_same_seed_same_batches_different_seed_different_batches():
    cfg = StreamConfig(num_envs=2, frame_stack=4, palette=256)

    def batches(seed):
        streams, buf = EpisodeStreams(cfg, 0), make_buffer(cfg, 200, seed=seed)
        out = []
        for _ in range(150):
            buf.add(*streams.step())
            out.append(buf.sample(32).ids.copy())
        return np.concatenate(out)

    assert np.array_equal(batches(7), batches(7))
    assert not np.array_equal(batches(7), batches(8))


def test_uniform_coverage_chi_square():
    cfg = StreamConfig(frame_stack=4, min_len=50, max_len=100, palette=256)
    capacity = 500
    buf, ref, _ = run(cfg, capacity, adds=1200, check_every=10_000)
    assert len(buf) == capacity
    draws = 400
    counts = np.zeros(ref.next_id, dtype=np.int64)
    out = buf.empty_batch(1000)
    for _ in range(capacity * draws // 1000):
        np.add.at(counts, buf.sample_into(out).ids, 1)
    stored = counts[ref.ring_ids().start :]
    assert counts[: ref.ring_ids().start].sum() == 0
    assert (stored > 0).all(), "every stored id must come up"
    chi2 = ((stored - draws) ** 2 / draws).sum()
    df = capacity - 1
    # Wilson-Hilferty: chi2/df is ~normal after a cube root.
    z = ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    assert abs(z) < 4.5, f"chi-square {chi2:.0f} on {df} dof (z={z:.2f}) is not uniform"


def test_sample_into_torch_tensors_and_reuse():
    torch = pytest.importorskip("torch")
    cfg = StreamConfig(num_envs=2, frame_stack=4, palette=256)
    buf, ref, _ = run(cfg, 100, adds=60, check_every=1000)
    for window in (False, True):
        out = buf.empty_batch(16, window=window, torch=True)
        assert isinstance(out.obs, torch.Tensor) and out.obs.dtype == torch.uint8
        ptr = out.obs.data_ptr()
        for _ in range(3):
            assert buf.sample_into(out) is out
            assert out.obs.data_ptr() == ptr  # filled in place
            assert_batch_matches(out, ref)


def test_torch_outputs_moved_to_new_memory_are_written_there():
    # sample_into keeps numpy views of torch outputs between calls; a tensor
    # given new memory (set_) must be written in its new place, never the old.
    torch = pytest.importorskip("torch")
    cfg = StreamConfig(num_envs=1, frame_stack=4, palette=256)
    buf, ref, _ = run(cfg, 100, adds=60, check_every=1000)
    out = buf.empty_batch(8, torch=True)
    buf.sample_into(out)
    old = out.obs.clone()
    fresh = torch.zeros_like(out.obs)
    stale = out.obs.numpy()  # still the old memory
    stale_copy = stale.copy()
    out.obs.set_(fresh)
    buf.sample_into(out)
    assert out.obs.data_ptr() == fresh.data_ptr() and fresh.any()
    assert_batch_matches(out, ref)
    assert (stale == stale_copy).all() and old.shape == fresh.shape  # the old memory was left alone


def test_torch_outputs_reshaped_in_place_or_many_at_once_are_checked_and_correct():
    pytest.importorskip("torch")
    cfg = StreamConfig(num_envs=1, frame_stack=4, palette=256)
    buf, ref, _ = run(cfg, 100, adds=60, check_every=1000)
    outs = [buf.empty_batch(4 + i, torch=True) for i in range(7)]  # more than the view cache holds
    for _ in range(3):
        for out in outs:
            assert_batch_matches(buf.sample_into(out), ref)
    out = outs[-1]
    out.action.resize_(3)  # same memory, new shape: the shape check runs again
    with pytest.raises(ValueError, match=r"out.action must have shape \(10,\)"):
        buf.sample_into(out)


def test_a_forked_child_samples_with_threads_of_its_own():
    # The parent's gather threads do not exist in a fork: the child must start
    # its own pool, never wait for (or join) the parent's.
    import os
    import time

    cfg = StreamConfig(frame_stack=4, frame_shape=(84, 84), min_len=20, max_len=60, palette=256)
    buf, streams = make_buffer(cfg, 300, seed=1), EpisodeStreams(cfg, 1)
    for _ in range(300):
        buf.add(*streams.step())
    buf.sample(64)  # large enough for the pool: the parent's threads start
    pid = os.fork()
    if pid == 0:  # child: exit code says what happened, nothing else runs here
        try:
            code = 0 if len(buf.sample(64).ids) == 64 and len(buf.sample(64).ids) == 64 else 1
        except BaseException:
            code = 2
        os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung while sampling")
    assert os.waitstatus_to_exitcode(status) == 0
