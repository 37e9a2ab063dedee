"""Saving and loading a buffer: exact resumption, and files that must not load."""

import copy
import json
import os
import pickle
import struct
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import dqn_fast.replay_file as replay_file
from dqn_fast import ReplayBuffer
from dqn_fast._core import crc32c
from dqn_fast.replay import ReplayFileError
from reference import EpisodeStreams, ReferenceReplay, StreamConfig, assert_batch_matches, compression_kwargs
from test_replay import make_buffer

CONFIGS = {
    "atari-like": (StreamConfig(num_envs=2, frame_stack=4, frame_shape=(6, 7), palette=256), 40),
    "channel-last": (StreamConfig(num_envs=3, frame_stack=3, stack_axis=-1, palette=3, action_shape=(2,)), 30),
    "vector": (StreamConfig(frame_stack=1, frame_shape=(4,), dtype=np.float32, palette=1000), 25),
    "short-episodes": (StreamConfig(frame_stack=4, padding="random", min_len=1, max_len=2, palette=256), 20),
    "glitches": (StreamConfig(num_envs=2, frame_stack=2, p_glitch=0.2, p_jump=0.2, max_len=8), 24),
    # Compressed: the arena, its frame table and the streams' chains travel; a
    # tight arena (lz4) has wrapped and evicted by bytes before the save.
    "lz4-tight-arena": (StreamConfig(num_envs=2, frame_stack=4, frame_shape=(9, 9), palette=4, drift=0.1), 60),
    "zstd-channel-last": (StreamConfig(num_envs=2, frame_stack=3, stack_axis=-1, frame_shape=(8, 8), drift=0.1), 30),
}
COMPRESSION = {
    "lz4-tight-arena": lambda cfg: compression_kwargs(cfg, "lz4", 40),
    "zstd-channel-last": lambda cfg: compression_kwargs(cfg, "zstd"),
}


def assert_same_batch(a, b):
    for name, x, y in zip(a._fields, a, b):
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("adds_before", [0, 7, 100], ids=["empty", "before-wrap", "wrapped"])
@pytest.mark.parametrize("name", CONFIGS)
def test_resumed_buffer_continues_exactly_like_the_original(tmp_path, name, adds_before):
    cfg, capacity = CONFIGS[name]
    window = cfg.p_jump == 0
    streams, ref = EpisodeStreams(cfg, 1), ReferenceReplay(capacity)
    buf = make_buffer(cfg, capacity, seed=3, **COMPRESSION.get(name, lambda cfg: {})(cfg))
    for _ in range(adds_before):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
    if adds_before:
        buf.sample(5)  # advance the PRNG: its state must travel too
    buf.save(tmp_path / "buf.rb")
    resumed = ReplayBuffer.load(tmp_path / "buf.rb")
    assert type(resumed) is ReplayBuffer and repr(resumed) == repr(buf)
    assert (resumed.total_adds, resumed.frames_written, resumed.seed) == (buf.total_adds, buf.frames_written, buf.seed)
    for _ in range(60):
        if len(buf):
            a, b = buf.sample(16), resumed.sample(16)
            assert_same_batch(a, b)
            assert_batch_matches(b, ref)
            if window:
                assert_same_batch(buf.sample(4, window=True), resumed.sample(4, window=True))
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
        resumed.add(*args)
        assert (len(resumed), resumed.frames_written) == (len(buf), buf.frames_written)
        assert resumed.frame_memory_used == buf.frame_memory_used


def test_pickle_and_deepcopy_use_the_checked_format():
    cfg, capacity = CONFIGS["atari-like"]
    streams = EpisodeStreams(cfg, 2)
    buf = make_buffer(cfg, capacity)
    for _ in range(30):
        buf.add(*streams.step())
    for clone_of in (lambda b: pickle.loads(pickle.dumps(b)), copy.deepcopy):
        clone = clone_of(buf)
        assert_same_batch(clone.sample(8), buf.sample(8))
        args = streams.step()
        clone.add(*args)
        buf.add(*args)
        assert_same_batch(clone.sample(8), buf.sample(8))


def test_save_and_load_stream_without_copying_the_buffer(tmp_path):
    # The frames (~4.5 MB) go straight between the buffer's memory and the file.
    buf = ReplayBuffer(1000, (4, 64, 64), frame_stack=4, seed=0)
    streams = EpisodeStreams(StreamConfig(frame_stack=4, frame_shape=(64, 64), min_len=50, max_len=90, palette=256), 0)
    for _ in range(1100):
        buf.add(*[x[0] for x in streams.step()])
    tracemalloc.start()
    try:
        buf.save(tmp_path / "b.rb")
        saved_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        ReplayBuffer.load(tmp_path / "b.rb")
        load_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert buf.nbytes > 4_000_000
    assert max(saved_peak, load_peak) < buf.nbytes / 20, (saved_peak, load_peak)


def test_crc32c_known_values():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vectors
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    data = np.random.default_rng(0).integers(0, 256, 1001, dtype=np.uint8)
    assert crc32c(data[300:], crc32c(data[:300])) == crc32c(data)


# ---------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    cfg = StreamConfig(num_envs=2, frame_stack=3, frame_shape=(2, 3), min_len=4, max_len=9, palette=256)
    buf = make_buffer(cfg, 12, seed=5)
    streams = EpisodeStreams(cfg, 0)
    for _ in range(10):
        buf.add(*streams.step())
    path = tmp_path / "buf.rb"
    buf.save(path)
    return path, path.read_bytes(), buf


def load_bytes(path, data):
    path.write_bytes(bytes(data))
    return ReplayBuffer.load(path)


def parse(data):
    _, _, n = struct.unpack_from("<8sII", data)
    meta = json.loads(data[16 : 16 + n])
    arrays = {a["name"]: bytearray(data[a["offset"] : a["offset"] + a["nbytes"]]) for a in meta["arrays"]}
    return meta, arrays


def build(meta, arrays, version=replay_file._VERSION):
    """A well-formed file (offsets and checksums right) around whatever meta and arrays hold."""
    size = -1
    while True:
        header = json.dumps(meta, separators=(",", ":")).encode()
        if len(header) == size:
            break
        size, offset = len(header), 16 + len(header) + 4
        for a in meta["arrays"]:
            a["offset"], offset = offset, offset + len(arrays[a["name"]])
    head = struct.pack("<8sII", b"DQNFREPL", version, len(header)) + header
    names = [a["name"] for a in meta["arrays"]]
    body = b"".join(bytes(arrays[name]) for name in names)
    crcs = [crc32c(bytes(arrays[name])) for name in names]
    return head + struct.pack("<I", crc32c(head)) + body + struct.pack(f"<{len(crcs)}I", *crcs) + b"DQNF-END"


def test_rebuilding_an_untouched_file_gives_the_same_bytes(saved):
    path, data, _ = saved
    assert build(*parse(data)) == data  # so the tests below change only what they say


def test_every_truncation_is_rejected(saved):
    path, data, _ = saved
    for cut in range(len(data)):
        with pytest.raises(ReplayFileError, match="truncated|too short"):
            load_bytes(path, data[:cut])


def test_every_flipped_byte_is_rejected(saved):
    path, data, _ = saved
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x20
        with pytest.raises(ReplayFileError):
            load_bytes(path, bad)


def test_corruption_messages_say_where(saved):
    path, data, _ = saved
    meta, _ = parse(data)
    frames = meta["arrays"][0]
    assert frames["name"] == "frames"
    for pos, match in [
        (0, "wrong magic"),
        (20, "header checksum mismatch"),
        (frames["offset"] + 1, "checksum mismatch in array 'frames'"),
        (len(data) - 3, "wrong end marker"),
    ]:
        bad = bytearray(data)
        bad[pos] ^= 1
        with pytest.raises(ReplayFileError, match=match):
            load_bytes(path, bad)
    with pytest.raises(ReplayFileError, match="unexpected bytes after the end"):
        load_bytes(path, data + b"\0")
    for version in (0, 4, 2**32 - 1):
        with pytest.raises(ReplayFileError, match=f"format version {version} is not supported"):
            load_bytes(path, build(*parse(data), version=version))
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.load(path.parent / "missing.rb")


def edit(data, **changes):
    """The file with header fields changed ("config.obs_shape": ...) and valid checksums."""
    meta, arrays = parse(data)
    for key, value in changes.items():
        where, field = key.split(".")
        if value is KeyError:
            del meta[where][field]
        else:
            meta[where][field] = value
    return build(meta, arrays)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"config.obs_shape": [3, 2, 4]}, "array list does not match"),
        ({"config.obs_shape": [4, 2, 3]}, "invalid config: obs_shape"),
        ({"config.capacity": 11}, "array list does not match"),
        ({"config.capacity": "12"}, "config.capacity must be int"),
        ({"config.frame_stack": True}, "config.frame_stack must be int"),
        ({"config.obs_dtype": "<f4"}, "array list does not match"),
        ({"config.obs_dtype": "|O"}, "config.obs_dtype must be a bool, integer or float dtype"),
        ({"config.action_dtype": "nonsense"}, "config.action_dtype must be"),
        ({"config.action_dtype": "f4,,"}, "config.action_dtype must be"),
        ({"config.num_envs": 0}, "invalid config: num_envs"),
        ({"config.frame_reserve": 1e300}, "invalid config: frame_reserve"),
        ({"config.seed": KeyError}, "config must be an object with keys"),
        ({"config.extra": 1}, "config must be an object with keys"),
        ({"state.head": 11}, "array list does not match"),
        ({"state.head": -1}, r"state.head must be an int in \[0, 2\*\*62\)"),
        ({"state.tail": 5}, r"inconsistent buffer state: transition ids \[tail=5"),
        ({"state.rng": [0, 0, 0, 0]}, "PRNG state is all zeros"),
        ({"state.rng": [1, 2, 3]}, "state.rng must be 4 ints"),
        ({"state.next_seq": 10**30}, "state.next_seq must be an int"),
    ],
)
def test_hostile_headers_are_rejected_with_a_reason(saved, changes, match):
    path, data, _ = saved
    with pytest.raises(ReplayFileError, match=match):
        load_bytes(path, edit(data, **changes))


def hostile_arrays(data, name, fill):
    meta, arrays = parse(data)
    dtype = np.dtype(next(a["dtype"] for a in meta["arrays"] if a["name"] == name))
    values = np.frombuffer(arrays[name], dtype).copy()
    fill(values)
    arrays[name] = bytearray(values.tobytes())
    return build(meta, arrays)


@pytest.mark.parametrize(
    "name,fill,match",
    [
        ("slots", lambda v: v.__setitem__(5, 10**6), "names frame slot 1000000, which holds no frame"),
        ("slots", lambda v: v.__setitem__(5, 2**32 - 1), "which holds no frame"),
        ("oldest", lambda v: v.__setitem__(3, 0), "records the wrong oldest frame"),
        ("flags", lambda v: v.__setitem__(4, 0xFF), "unknown flags"),
        ("stream_open", lambda v: v.__setitem__(0, 2), "stream open flags must be 0 or 1"),
        ("stream_seqs", lambda v: v.__setitem__(slice(None), 10**9), "open stream names frames"),
        ("stream_seqs", lambda v: v.__setitem__(slice(None), -3), "open stream names frames"),
    ],
)
def test_hostile_arrays_with_valid_checksums_are_rejected(saved, name, fill, match):
    # What the checksums cannot catch, the core's invariant check does: no
    # loaded index may make add or sample read outside the buffer.
    path, data, _ = saved
    with pytest.raises(ReplayFileError, match="inconsistent buffer state: .*" + match):
        load_bytes(path, hostile_arrays(data, name, fill))


def test_window_flag_must_match_the_frames(saved):
    path, data, buf = saved
    meta, arrays = parse(data)
    k = buf.frame_stack
    slots = np.frombuffer(arrays["slots"], np.uint32).reshape(-1, 2 * k).copy()
    flags = np.frombuffer(arrays["flags"], np.uint8)
    # A shift transition whose first two obs frames differ: make its next_obs
    # start with obs frame 0 instead of 1 (same frames, same oldest).
    row = next(r for r in range(len(flags)) if flags[r] & 4 and slots[r, 0] != slots[r, 1])
    slots[row, k] = slots[row, 0]
    arrays["slots"] = bytearray(slots.tobytes())
    with pytest.raises(ReplayFileError, match="marked as a shift but its frames are not"):
        load_bytes(path, build(meta, arrays))


# ------------------------------------------------------------ failed saves


def test_failed_saves_leave_the_previous_file_and_no_temp_file(saved, monkeypatch):
    path, data, buf = saved
    buf.add(*EpisodeStreams(StreamConfig(num_envs=2, frame_stack=3, frame_shape=(2, 3)), 9).step())

    with pytest.raises(FileNotFoundError):
        buf.save(path.parent / "no-such-dir" / "buf.rb")

    calls = []

    def crash_mid_write(f, array):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"partial")
            raise KeyboardInterrupt  # even an interrupt cleans up
        return real_write(f, array)

    real_write = replay_file._write_array
    monkeypatch.setattr(replay_file, "_write_array", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        buf.save(path)
    monkeypatch.undo()

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        buf.save(path)
    monkeypatch.undo()

    assert sorted(os.listdir(path.parent)) == ["buf.rb"]
    assert path.read_bytes() == data
    ReplayBuffer.load(path)
    buf.save(path)  # and the buffer is still usable (its lock was released)
    assert ReplayBuffer.load(path).total_adds == buf.total_adds


def test_saving_while_another_thread_adds_gives_consistent_snapshots(tmp_path):
    cfg = StreamConfig(num_envs=2, frame_stack=4, frame_shape=(16, 16), min_len=3, max_len=30, palette=256)
    streams, ref = EpisodeStreams(cfg, 4), ReferenceReplay(300)
    buf = make_buffer(cfg, 300, seed=1)
    stop, errors = threading.Event(), []

    def adder():
        try:
            while not stop.is_set():
                args = streams.step()
                ref.add(*args)  # the reference learns first
                buf.add(*args)
                len(buf)  # reads published counters: must never wait behind a save
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=adder)
    thread.start()
    try:
        for i in range(8):
            buf.save(tmp_path / f"s{i}.rb")
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]
    for i in range(8):
        snap = ReplayBuffer.load(tmp_path / f"s{i}.rb")
        if len(snap):
            assert_batch_matches(snap.sample(64), ref, range(snap.total_adds - len(snap), snap.total_adds))


def test_a_version_1_file_loads_as_the_uniform_one_step_buffer_it_was():
    # tests/data/replay_v1.dqnr was written by the version-1 release (capacity 40,
    # obs (3, 5, 6), k=3, 2 envs, 57 adds with ends, wrapped), and the npz holds
    # the batch of 16 that buffer sampled right after saving.
    data = Path(__file__).parent / "data"
    buf = ReplayBuffer.load(data / "replay_v1.dqnr")
    assert (buf.n_step, buf.prioritized, buf.max_priority) == (1, False, 1.0)
    want = np.load(data / "replay_v1_sample16.npz")
    batch = buf.sample(16)
    for field in want.files:
        np.testing.assert_array_equal(getattr(batch, field), want[field], err_msg=field)
    np.testing.assert_array_equal(batch.discount, np.float32(buf.gamma))
    np.testing.assert_array_equal(batch.weights, 1.0)
