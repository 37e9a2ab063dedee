"""Compressed frame stores (compression="lz4" / "zstd"): real frames, bounds, the arena.

The replay semantics with compression on are the property tests of
test_replay.py / test_nstep.py (parametrized over the codec and over tight
arenas); persistence and fuzzing cover compressed bases too. Here: what only
compression has.
"""

import functools

import numpy as np
import pytest

from dqn_fast import ReplayBuffer
from reference import EpisodeStreams, ReferenceReplay, StreamConfig, assert_batch_matches, min_frame_memory

FRAME = (84, 84)
RAW = FRAME[0] * FRAME[1]


@functools.lru_cache(maxsize=None)
def breakout(steps=400):
    """Real frames: Breakout through AtariPreprocessing (frame skip 4, 84x84
    gray), a seeded random policy. The stream of (frame, reward, ended)."""
    gym = pytest.importorskip("gymnasium")
    ale_py = pytest.importorskip("ale_py")
    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=0.0)
    env = gym.wrappers.AtariPreprocessing(env, frame_skip=4, screen_size=84, grayscale_obs=True, noop_max=30)
    rng = np.random.default_rng(0)
    frame, _ = env.reset(seed=0)
    out = [(frame, 0.0, False)]
    for _ in range(steps):
        frame, reward, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        out.append((frame, float(reward), bool(term or trunc)))
        if term or trunc:
            frame, _ = env.reset()
            out.append((frame, 0.0, False))
    env.close()
    return out


def fill(buf, stream, ref=None):
    """Stacks of 4 with reset padding, as an Atari trainer adds them."""
    obs = np.stack([stream[0][0]] * 4)
    for frame, reward, ended in stream[1:]:
        nxt = np.concatenate([obs[1:], frame[None]])
        args = (obs[None], np.array([0]), np.array([reward], np.float32), nxt[None], np.array([ended]), np.array([False]))
        buf.add(*args)
        if ref is not None:
            ref.add(*args)
        obs = np.stack([frame] * 4) if ended else nxt
    return buf


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_real_frames_come_back_bit_exact_and_small(compression):
    stream = breakout()
    buf, ref = ReplayBuffer(1000, (4, *FRAME), frame_stack=4, seed=1, compression=compression), ReferenceReplay(1000)
    fill(buf, stream, ref)
    assert len(buf) == ref.next_id  # the default arena holds them all
    live = range(ref.next_id)
    assert_batch_matches(buf.get(np.arange(ref.next_id)), ref, live)
    assert_batch_matches(buf.sample(64), ref, live)
    assert_batch_matches(buf.sample(64, window=True), ref, live)
    # Stored once and coded: far below the 7,056 raw bytes per frame (the
    # benchmark measures the real figure; a codec that did nothing fails).
    assert buf.frame_memory_used / buf.frames_written < RAW / 10


def test_incompressible_frames_cost_at_most_raw_plus_a_byte():
    # Random noise: no patch pays and no key compresses, so frames are stored
    # raw with their tag byte. Bounded expansion, and still exact.
    cfg = StreamConfig(frame_stack=4, frame_shape=FRAME, palette=256, min_len=20, max_len=60)
    capacity = 200
    buf = ReplayBuffer(capacity, (4, *FRAME), frame_stack=4, seed=2, compression="lz4",
                       frame_memory=(capacity + 50) * (RAW + 1))
    streams, ref = EpisodeStreams(cfg, 3), ReferenceReplay(capacity)
    for _ in range(150):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
    assert buf.frame_memory_used <= buf.frames_written * (RAW + 1)
    assert buf.frame_memory_used >= buf.frames_written * RAW  # nothing coded smaller: the bound is tight
    assert_batch_matches(buf.sample(32), ref, range(ref.next_id))


def test_a_full_arena_evicts_the_oldest_and_len_says_so():
    cfg = StreamConfig(num_envs=2, frame_stack=4, frame_shape=(10, 10), palette=256, min_len=30, max_len=60)
    budget = min_frame_memory(cfg) + 30 * 101
    buf = ReplayBuffer(500, (4, 10, 10), frame_stack=4, num_envs=2, seed=4, compression="zstd", frame_memory=budget)
    streams, ref = EpisodeStreams(cfg, 5), ReferenceReplay(500)
    for step in range(400):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
        assert buf.frame_memory_used <= buf.frame_memory == budget
        live = range(ref.next_id - len(buf), ref.next_id)  # always the most recent len(buf)
        if step % 10 == 0:
            assert_batch_matches(buf.sample(16), ref, live)
    assert 0 < len(buf) < 200  # far fewer than capacity: the bytes ran out first


def test_default_arena_is_an_eighth_of_the_raw_frames():
    buf = ReplayBuffer(10_000, (4, *FRAME), frame_stack=4, compression="lz4")
    assert buf.frame_memory == buf.frame_capacity * (RAW // 8 + 1)
    assert buf.nbytes < buf.frame_capacity * RAW / 6  # everything reserved, table and index included
    assert ReplayBuffer(100, (4,), compression="zstd").frame_memory >= 100 * 5  # small frames: room to store them raw


def test_compression_arguments_are_checked():
    with pytest.raises(ValueError, match="compression must be None, 'lz4' or 'zstd', got 'gzip'"):
        ReplayBuffer(10, (4, 8, 8), frame_stack=4, compression="gzip")
    with pytest.raises(TypeError, match="compression must be None, 'lz4' or 'zstd', got bool"):
        ReplayBuffer(10, (4, 8, 8), frame_stack=4, compression=True)
    with pytest.raises(ValueError, match="pass compression='lz4' or 'zstd' too"):
        ReplayBuffer(10, (4, 8, 8), frame_stack=4, frame_memory=10_000)
    with pytest.raises(TypeError, match="frame_memory must be an int"):
        ReplayBuffer(10, (4, 8, 8), frame_stack=4, compression="lz4", frame_memory=1e6)
    with pytest.raises(ValueError, match="frame_memory must be at least 1"):
        ReplayBuffer(10, (4, 8, 8), frame_stack=4, compression="lz4", frame_memory=0)


def test_an_arena_below_one_add_names_the_minimum():
    cfg = StreamConfig(num_envs=3, frame_stack=4, frame_shape=(8, 8))
    least = min_frame_memory(cfg)
    with pytest.raises(ValueError, match=f"frame_memory={least - 1} bytes is less than one add of 3 envs can need: "
                                         f"at least {least} bytes"):
        ReplayBuffer(10, (4, 8, 8), frame_stack=4, num_envs=3, compression="lz4", frame_memory=least - 1)
    assert ReplayBuffer(10, (4, 8, 8), frame_stack=4, num_envs=3, compression="lz4", frame_memory=least).frame_memory == least


def test_an_arena_the_machine_cannot_back_is_a_memory_error_at_construction():
    with pytest.raises(MemoryError, match=r"cannot allocate \d+ bytes for the replay buffer"):
        ReplayBuffer(1000, (4, *FRAME), frame_stack=4, compression="lz4", frame_memory=2**60)


def test_uncompressed_buffers_report_no_arena():
    buf = ReplayBuffer(10, (4, 8, 8), frame_stack=4)
    assert (buf.compression, buf.frame_memory, buf.frame_memory_used) == (None, 0, 0)


def test_coded_sizes_do_not_depend_on_other_buffers_in_the_process():
    # A Blosc2 compression context keeps state from the sizes it compressed
    # before; each buffer owns its own, so the same adds code the same way
    # (and evict the same transitions) whatever else ran first.
    def filled(shape, seed):
        cfg = StreamConfig(num_envs=2, frame_stack=4, frame_shape=shape, palette=2, drift=0.05)
        buf = ReplayBuffer(200, (4, *shape), frame_stack=4, num_envs=2, compression="lz4")
        streams = EpisodeStreams(cfg, seed)
        for _ in range(100):
            buf.add(*streams.step())
        return buf.frame_memory_used

    first = filled((16, 16), 1)
    filled((9, 9), 2)  # other frame sizes in between
    assert filled((16, 16), 1) == first


def test_the_codec_probe_decodes_every_method_exactly():
    # The benchmark's codec comparison (csrc/codec_probe.hpp) checks each
    # decoded frame against the original itself; here: it runs, and refuses
    # what it does not know.
    from dqn_fast import _core

    frames = np.stack([f for f, _, _ in breakout(60)])
    for method in ("patch", "xor-lz4", "xor-zstd", "lz4", "zstd"):
        size, seconds = _core._probe_codec(frames, method, 1)
        assert 0 < size < (len(frames) - 1) * RAW and seconds > 0, method
    with pytest.raises(ValueError, match="method must be patch, xor-lz4, xor-zstd, lz4 or zstd"):
        _core._probe_codec(frames, "gzip", 1)
