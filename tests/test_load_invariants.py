"""Loading enforces every invariant of a saved state, one test per invariant.

Each case starts from a valid file, breaks exactly one invariant (the
invariants at the top of csrc/episode_index.hpp, EpisodeIndex::check,
ReplayBuffer::restore, and the header checks in dqn_fast/replay_file.py),
rewrites every checksum so only that invariant can catch it, and expects a
``ReplayFileError`` naming it.
"""

import functools
import subprocess
import sys

import numpy as np
import pytest

import dqn_fast.replay_file as replay_file
from dqn_fast.replay import ReplayFileError
from reference import EpisodeStreams, ReferenceReplay, StreamConfig, assert_batch_matches
from test_persistence import build, parse
from test_replay import make_buffer

# Two envs, k=3, non-shift transitions (p_jump): after 30 adds the transition
# ring has wrapped (tail > 0) but the frame ring has not (next_seq < frame_capacity).
CFG = StreamConfig(num_envs=2, frame_stack=3, frame_shape=(6, 7), min_len=6, max_len=14, palette=256, p_jump=0.2)
CAPACITY, ADDS = 40, 30


@functools.lru_cache(maxsize=None)
def saved(obs_dtype=np.uint8):
    """(file bytes, buffer, reference of every add) for a buffer of CFG."""
    cfg = StreamConfig(**{**CFG.__dict__, "dtype": obs_dtype})
    buf, ref, streams = make_buffer(cfg, CAPACITY, seed=7), ReferenceReplay(CAPACITY), EpisodeStreams(cfg, 1)
    for _ in range(ADDS):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
    buf.sample(3)  # move the PRNG off its seeded state
    return replay_file.to_bytes(buf), buf, ref


def load(data):
    """from_bytes, with any exception but ReplayFileError turned into a plain
    AssertionError naming it (the contract: ReplayFileError or a buffer)."""
    try:
        return replay_file.from_bytes(data)
    except ReplayFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other type is the failure
        error = f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"load raised {error}, not ReplayFileError")


class File:
    """A parsed file with writable numpy views of its index arrays."""

    def __init__(self, data, buf):
        self.meta, self.arrays = parse(data)
        self.state, self.config = self.meta["state"], self.meta["config"]
        self.k, self.ne, self.cap, self.fcap = buf.frame_stack, buf.num_envs, buf.capacity, buf.frame_capacity
        k = self.k
        view = lambda name, dtype, *shape: np.frombuffer(self.arrays[name], dtype).reshape(*shape)  # noqa: E731
        self.slots = view("slots", np.uint32, -1, 2 * k)
        self.oldest = view("oldest", np.int64, -1)
        self.flags = view("flags", np.uint8, -1)
        self.stream_open = view("stream_open", np.uint8, -1)
        self.stream_seqs = view("stream_seqs", np.int64, -1, k)

    def ids(self):
        return range(self.state["tail"], self.state["head"])

    def row(self, tid):
        return tid % self.cap

    def last_oldest(self, env):
        return max((self.oldest[self.row(i)] for i in self.ids() if i % self.ne == env), default=0)

    def open_env(self, ok=lambda e: True):
        return next(e for e in range(self.ne) if self.stream_open[e] == 1 and ok(e))

    def layout(self, name):
        return next(a for a in self.meta["arrays"] if a["name"] == name)

    def bytes(self):
        return build(self.meta, self.arrays)


# ------------------------------------------------------------ the corruptions
# Each takes a File and breaks one invariant in place.


def set_state(key, value):
    return lambda f: f.state.__setitem__(key, value(f) if callable(value) else value)


def set_config(**changes):
    return lambda f: f.config.update(changes)


def edit_row(view, which, fn):
    """Changes one entry of an index array: the newest or oldest stored transition's."""

    def corrupt(f):
        r = f.row(f.state["head"] - 1 if which == "newest" else f.state["tail"])
        getattr(f, view)[r] = fn(getattr(f, view)[r])

    return corrupt


def edit_stream(j, value):
    """Sets seq j of the first open env stream."""
    return lambda f: f.stream_seqs.__setitem__((f.open_env(), j), value(f))


def swap_env_neighbours(f):
    # Two consecutive transitions of one env, swapped whole: each row stays
    # self-consistent, but oldest now decreases with id within the env.
    a = next(i for i in f.ids() if i + f.ne in f.ids() and f.oldest[f.row(i)] < f.oldest[f.row(i + f.ne)])
    ra, rb = f.row(a), f.row(a + f.ne)
    for name in ("slots", "oldest", "actions", "rewards", "flags"):
        arr, w = f.arrays[name], len(f.arrays[name]) // len(f.oldest)
        arr[ra * w : (ra + 1) * w], arr[rb * w : (rb + 1) * w] = arr[rb * w : (rb + 1) * w], arr[ra * w : (ra + 1) * w]


def unsorted_stream(f):
    e = f.open_env(lambda e: any(np.diff(f.stream_seqs[e]) > 0))
    j = int(np.flatnonzero(np.diff(f.stream_seqs[e]) > 0)[0])
    f.stream_seqs[e, [j, j + 1]] = f.stream_seqs[e, [j + 1, j]]


def stream_older_than_transitions(f):
    e = f.open_env(lambda e: f.last_oldest(e) > 0)
    f.stream_seqs[e, 0] = f.last_oldest(e) - 1


def unwritten_slot(value):
    # The newest next_obs frame of the newest transition: not its oldest
    # frame, so `oldest` stays right and only the slot check can fire.
    def fn(f):
        assert f.state["next_seq"] < f.fcap, "the fixture's frame ring must not have wrapped"
        f.slots[f.row(f.state["head"] - 1), -1] = value(f)

    return fn


def shift_flag_on_a_jump(f):
    k = f.k
    rows = [f.row(i) for i in f.ids()]
    r = next(r for r in rows if not f.flags[r] & 4 and (f.slots[r, 1:k] != f.slots[r, k:-1]).any())
    f.flags[r] |= 4


def follows_an_ended_episode(f):
    # kFollows (8) says the env's previous transition left its stream open:
    # set it right after a terminated or truncated one (n-step windows would cross the end).
    tid = next(i for i in f.ids() if i - f.ne in f.ids() and f.flags[f.row(i - f.ne)] & 3)
    f.flags[f.row(tid)] |= 8


def open_stream_after_an_episode_end(f):
    # The env's newest transition terminates, yet its stream says open: the
    # next add would continue (and n-step windows cross) the ended episode.
    e = f.open_env(lambda e: f.state["head"] - f.ne + e in f.ids())
    f.flags[f.row(f.state["head"] - f.ne + e)] |= 1


def open_stream_not_the_newest_next_obs(f):
    # Seqs that pass every ordering check (all the newest transition's oldest
    # frame) but are not its next_obs: the next add would join other frames.
    e = f.open_env(lambda e: f.state["head"] - f.ne + e in f.ids())
    f.stream_seqs[e, :] = f.last_oldest(e)


def follows_flag_across_a_jump(f):
    # An episode end erased and the next episode's first transition marked as
    # following it: its obs (a reset) is not the predecessor's next_obs (the
    # final obs), so an n-step window would join unrelated frames.
    frames = np.frombuffer(f.arrays["frames"], np.uint8).reshape(-1, *CFG.frame_shape)
    k = f.k

    def after_an_end(i):
        prev = f.row(i - f.ne)
        return (i - f.ne in f.ids() and f.flags[prev] & 3 and not f.flags[f.row(i)] & 8
                and (frames[f.slots[f.row(i), :k]] != frames[f.slots[prev, k:]]).any())

    i = next(i for i in f.ids() if after_an_end(i))
    f.flags[f.row(i - f.ne)] &= ~np.uint8(3)
    f.flags[f.row(i)] |= 8


def with_layout_dtype(field, array, value):
    # A dtype string the layout list agrees with, so only the dtype check can fire.
    def fn(f):
        f.config[field] = value
        f.layout(array)["dtype"] = value

    return fn


def wrapped_shape(field, array, extra):
    # Extra dims whose product is 1 modulo 2**64: the element count overflows
    # to the original one. The layout list agrees (its own product wraps too).
    def fn(f):
        f.config[field] = f.config[field][:1] + extra + f.config[field][1:] if field == "obs_shape" else extra
        entry = f.layout(array)
        entry["shape"] = entry["shape"][:1] + extra + entry["shape"][1:]

    return fn


def frame_store_of_zero_bytes(f):
    # frame_capacity * frame_bytes == 2**64 exactly: frame_reserve 0 makes
    # frame_capacity = capacity + 2k(k+1)num_envs = 4096, frames of 2**52
    # bytes. An empty buffer, so the file still holds no frame bytes.
    k, ne, big = f.k, f.ne, 2**26
    f.config.update(capacity=4096 - 2 * k * (k + 1) * ne, frame_reserve=0.0, obs_shape=[k, big, big])
    f.state.update(head=0, tail=0, next_seq=0)
    for a in f.meta["arrays"]:
        rows = f.ne if a["name"].startswith("stream") else 0
        a["shape"][0] = rows
        a["nbytes"] = len(f.arrays[a["name"]]) if rows else 0
        if not rows:
            f.arrays[a["name"]] = bytearray()
    f.layout("frames")["shape"] = [0, big, big]
    f.stream_open[:] = 0


D = [2**32 + 1, 2**32 - 1, 2**32 + 1, 2**32 - 1]  # product == 1 (mod 2**64)
assert np.prod(np.array(D, dtype=np.uint64)) == 1


CASES = [
    # transition ids [tail, head)
    ("tail > head", set_state("tail", lambda f: f.state["head"] + 1), r"transition ids \[tail="),
    ("head - tail > capacity", set_state("tail", lambda f: f.state["head"] - f.cap - 1), r"transition ids \[tail="),
    ("head not a multiple of num_envs", set_state("head", lambda f: f.state["head"] - 1), "multiple of num_envs"),
    # frame counter
    ("next_seq negative", set_state("next_seq", -1), r"state\.next_seq must be an int"),
    ("next_seq 2**62", set_state("next_seq", 2**62), r"state\.next_seq must be an int"),
    ("next_seq 2**64", set_state("next_seq", 2**64), r"state\.next_seq must be an int"),
    # transitions and their frames
    ("slot never written", unwritten_slot(lambda f: f.state["next_seq"]), "which holds no frame"),
    ("slot past the frame ring", unwritten_slot(lambda f: f.fcap), "which holds no frame"),
    ("slot 2**32-1", unwritten_slot(lambda f: 2**32 - 1), "which holds no frame"),
    ("oldest too small", edit_row("oldest", "newest", lambda v: v - 1), "records the wrong oldest frame"),
    ("oldest too large", edit_row("oldest", "oldest", lambda v: v + 1), "records the wrong oldest frame"),
    ("env oldest decreases", swap_env_neighbours, "names frames older than its env's previous one"),
    # env streams
    ("stream seqs decrease", unsorted_stream, "open stream names frames that were not written in order"),
    ("stream seq >= next_seq", edit_stream(-1, lambda f: f.state["next_seq"]), "open stream names frames"),
    ("stream older than env's transitions", stream_older_than_transitions, "open stream names frames"),
    ("stream seq negative", edit_stream(0, lambda f: -1), "open stream names frames"),
    ("stream_open 2", lambda f: f.stream_open.__setitem__(0, 2), "stream open flags must be 0 or 1"),
    ("stream_open 255", lambda f: f.stream_open.__setitem__(-1, 255), "stream open flags must be 0 or 1"),
    # flags and PRNG
    ("unknown flag bit 16", edit_row("flags", "oldest", lambda v: v | 16), "unknown flags"),
    ("follows flag after an episode end", follows_an_ended_episode, "continues an episode that ended"),
    ("open stream after an episode end", open_stream_after_an_episode_end, "stream is open but its newest transition"),
    ("open stream not the newest next_obs", open_stream_not_the_newest_next_obs, "open stream is not its newest"),
    ("follows flag across an erased episode end", follows_flag_across_a_jump, "but its obs is not that transition's next_obs"),
    ("unknown flag bit 0x80", edit_row("flags", "newest", lambda v: v | 0x80), "unknown flags"),
    ("shift flag on a non-shift", shift_flag_on_a_jump, "marked as a shift but its frames are not"),
    ("PRNG all zeros", set_state("rng", [0, 0, 0, 0]), "PRNG state is all zeros"),
    # config bounds: a tiny file must not make the loader allocate much
    ("num_envs 3e6", set_config(num_envs=3_000_000), "num_envs"),
    ("num_envs 3e6, capacity 3e6", set_config(num_envs=3_000_000, capacity=3_000_000), "num_envs"),
    ("sample_threads 10000", set_config(sample_threads=10_000), "sample_threads"),
    ("obs_shape [] with frame_stack 3", set_config(obs_shape=[]), "obs_shape"),
    ("obs_shape [] channel-last", set_config(obs_shape=[], stack_axis=-1), "obs_shape"),
    # dtype strings: only native-order bool/int/float reach numpy and the core
    *[
        (f"{field} {value}", set_config(**{field: value}), field)
        for field in ("obs_dtype", "action_dtype")
        for value in ("<i16", "|b2", "<U4", "<u16", "|f1")
    ],
    ("action_dtype >i8 (non-native)", with_layout_dtype("action_dtype", "actions", ">i8"), "action_dtype"),
    # sizes that overflow 64 bits
    ("capacity 2**62", set_config(capacity=2**62), "invalid config"),
    ("capacity 2**70", set_config(capacity=2**70), "invalid config"),
    ("capacity*frame_bytes > 2**64", set_config(capacity=2**31, obs_shape=[3, 2**17, 2**17]), "invalid config"),
    ("frame store of 2**64 bytes", frame_store_of_zero_bytes, "invalid config"),
    ("obs_shape element count wraps", wrapped_shape("obs_shape", "frames", D), "obs_shape|invalid config"),
    ("action_shape element count wraps", wrapped_shape("action_shape", "actions", D), "action_shape|invalid config"),
]


@pytest.mark.parametrize("corrupt,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_broken_invariant_is_rejected_with_a_reason(corrupt, match):
    data, buf, _ = saved()
    f = File(data, buf)
    corrupt(f)
    bad = f.bytes()
    assert bad != data, "the corruption changed nothing"
    with pytest.raises(ReplayFileError, match=match):
        load(bad)


def test_non_native_obs_dtype_is_rejected():
    # '>f4' has the itemsize of the saved '<f4': only a byte-order check can
    # catch it (loaded, every frame would read byte-swapped).
    data, buf, _ = saved(np.float32)
    f = File(data, buf)
    with_layout_dtype("obs_dtype", "frames", ">f4")(f)
    with pytest.raises(ReplayFileError, match="obs_dtype"):
        load(f.bytes())


@pytest.mark.parametrize("obs_dtype", [np.uint8, np.float32], ids=["uint8", "float32"])
def test_the_repaired_file_loads_and_matches_the_reference(obs_dtype):
    # The files above differ from this one only in what each case says.
    data, buf, ref = saved(obs_dtype)
    f = File(data, buf)
    assert f.bytes() == data
    assert f.state["tail"] > 0 and f.state["next_seq"] < f.fcap and f.state["head"] % f.ne == 0
    loaded = load(f.bytes())
    live = range(loaded.total_adds - len(loaded), loaded.total_adds)
    assert (live.start, live.stop) == (f.state["tail"], f.state["head"])
    for _ in range(5):
        assert_batch_matches(loaded.sample(32), ref, live)


# What error reporters do with a failure (Sentry by default, pytest's long
# tracebacks, IPython's verbose mode): repr() the frames' arguments and locals.
RENDER_LOCALS = """
import sys, traceback
from dqn_fast import ReplayBuffer, ReplayFileError
try:
    if sys.argv[1] == "file":
        ReplayBuffer.load(sys.argv[2])
    else:
        ReplayBuffer(40, (3, 6, 7), frame_stack=3, num_envs=0)
except ValueError as exc:  # ReplayFileError is one
    traceback.TracebackException.from_exception(exc, capture_locals=True)
    print("rendered", type(exc).__name__)
"""


@pytest.mark.parametrize("what", ["file", "constructor"])
def test_a_rejected_buffer_can_be_rendered_in_a_traceback(tmp_path, what):
    # The frames of a rejected load or constructor call must not hold a buffer
    # whose native part was never built: repr() of one reads uninitialised
    # memory. In a subprocess, because the failure mode is a segfault.
    data, buf, _ = saved()
    f = File(data, buf)
    f.config["num_envs"] = 0  # rejected by the constructor
    (tmp_path / "bad.rb").write_bytes(f.bytes())
    out = subprocess.run(
        [sys.executable, "-c", RENDER_LOCALS, what, str(tmp_path / "bad.rb")],
        cwd=tmp_path, capture_output=True, timeout=120,  # not the source tree: it shadows the installed package
    )
    tail = out.stderr.decode()[-400:]
    assert out.returncode == 0 and out.stdout.startswith(b"rendered"), f"exit {out.returncode}: ...{tail}"
