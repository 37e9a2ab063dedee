"""Hypothesis fuzzing of replay buffer files (dqn_fast/replay_file.py + the core's restore).

Attack classes covered:
  1. Header fields, checksums recomputed: every config and state field, each
     rng entry, each "arrays" layout entry and each of its fields and shape
     dims, whole sections, deleted and extra keys; replaced by negative, zero,
     huge (up to 2**70) and near-miss ints (the saved value +-3), bools,
     floats (nan, inf), strings (dtype-like ones too), lists, dicts, None.
  2. Array contents, checksums recomputed: frames, slots, oldest, actions,
     rewards, flags, stream_open, stream_seqs (and a prioritized buffer's
     priorities; a compressed buffer's arena and frame table) get random bytes at random offsets, single bit flips, elements copied from elsewhere in the same
     array, and elements nudged by +-3; whole transition rows and env
     stream rows copied over others.
  3. Raw damage, checksums NOT recomputed: truncation, bit flips, overwritten
     byte ranges, inserted and appended bytes.
  4. Malformed header text with a valid checksum: bad UTF-8, BOM, trailing
     data, deep nesting, a 5000-digit int, NaN/Infinity/1e400, floats for ints.

The property, for every load: it raises ReplayFileError (any other exception
fails the test), or the buffer it returns works and samples exactly what it
should. What "should" means depends on what was mutated:
  * header only (class 1): the arrays are what was added, so every sampled id
    in [tail, head) must be bit-exactly the transition added with that id
    (the ReferenceReplay of the saved buffer's stream of adds);
  * array contents (class 2): frames, actions, rewards and flags that pass
    the invariants legitimately differ from what was added. The checkable
    promise is that a loaded buffer samples what its file says: every sampled
    id is in [tail, head) and equals the transition decoded in Python from
    the file's own arrays (obs = frames[slots[id % capacity, :k]], ...; a
    compressed file's frames decoded by decode_arena, written here from the
    format's description, independently of the core);
  * raw damage (class 3): a checksum is wrong, so the load must fail (CRC-32C
    catches every burst of up to 32 bits; a pass would be a 2**-32 fluke).
    Edits that happen to leave the bytes unchanged must load.
After a successful load the buffer also takes more adds (continuing the saved
envs' streams; the new ids must come back exactly as added, the old ones as
before), samples again, and survives a save + load round trip that samples
identically.

DQN_FAST_FUZZ_EXAMPLES sets the examples per test (fewer under sanitizers).
"""

import copy
import functools
import json
import os
import struct
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dqn_fast.replay_file as replay_file
from dqn_fast._core import crc32c
from dqn_fast.replay import ReplayFileError
from reference import EpisodeStreams, ReferenceReplay, StreamConfig
from test_load_invariants import load
from test_persistence import parse
from test_replay import make_buffer

EXAMPLES = int(os.environ.get("DQN_FAST_FUZZ_EXAMPLES", "800"))
FUZZ = settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ADDS_AFTER = 6  # adds after a successful load


class Base(NamedTuple):
    data: bytes
    ref: ReferenceReplay  # every transition added, by id
    streams: EpisodeStreams  # the envs' streams where the saved buffer left them


# Small buffers covering the index's situations: wrapped transition ring with
# non-shift transitions, wrapped frame ring (float frames), channel-last with
# action vectors and surprising obs, early eviction by short episodes, empty.
S = functools.partial(StreamConfig, frame_shape=(6, 7))
BASES = {  # name: (stream, capacity, adds)
    "k3-jumps": (S(num_envs=2, frame_stack=3, min_len=3, max_len=12, palette=256, p_jump=0.15), 40, 30),
    "k1-float-wrapped": (S(frame_stack=1, dtype=np.float32, min_len=2, max_len=9, palette=1000), 30, 80),
    "k2-channel-last": (
        S(num_envs=3, frame_stack=2, stack_axis=-1, action_shape=(2,), palette=3, p_glitch=0.1, min_len=1, max_len=6),
        60, 40,
    ),
    "k4-short-episodes": (S(frame_stack=4, padding="random", min_len=1, max_len=2, palette=256), 30, 40),
    "empty": (S(num_envs=2, frame_stack=4), 30, 0),
    "k2-prioritized": (S(num_envs=2, frame_stack=2, min_len=2, max_len=10, palette=256, p_jump=0.1), 30, 40),
    # Compressed: 16x16 frames of few values, so keys go through Blosc2 and
    # patches are short; a tight arena wraps and evicts by bytes.
    "k4-lz4-arena-wrapped": (
        StreamConfig(num_envs=2, frame_stack=4, frame_shape=(16, 16), min_len=3, max_len=14, palette=2, p_jump=0.1,
                     drift=0.05),
        200, 150,
    ),
    "k2-zstd-channel-last": (
        StreamConfig(frame_stack=2, stack_axis=-1, frame_shape=(12, 10), palette=3, p_glitch=0.1, min_len=2, max_len=9,
                     drift=0.05),
        30, 45,
    ),
}
# Buffer options per base: the prioritized one adds the priorities array and
# max_priority to what gets attacked (one-step, so the checks stay exact).
OPTIONS = {
    "k2-prioritized": dict(prioritized=True, alpha=0.7),
    "k4-lz4-arena-wrapped": dict(compression="lz4", frame_memory=(4 * 2 * 4 + 1) * 257 + 1000),
    "k2-zstd-channel-last": dict(compression="zstd"),
}


@functools.lru_cache(maxsize=None)
def base(name) -> Base:
    cfg, capacity, adds = BASES[name]
    buf = make_buffer(cfg, capacity, seed=11, **OPTIONS.get(name, {}))
    ref, streams = ReferenceReplay(capacity), EpisodeStreams(cfg, 5)
    for _ in range(adds):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
    if adds:
        buf.sample(2)  # the PRNG state travels too
    if buf.prioritized and len(buf):  # priorities that differ, and a max above 1
        ids = buf.sample(len(buf)).ids
        buf.update_priorities(ids, np.linspace(0.0, 3.0, len(ids)))
    return Base(replay_file.to_bytes(buf), ref, streams)


def assemble(meta, arrays, pinned=frozenset(), transform=lambda text: text) -> bytes:
    """A file around any meta (even a malformed one): offsets right except at
    `pinned` paths, every checksum right; `transform` edits the JSON text."""
    size = -1
    for _ in range(20):  # the header's length and the offsets it lists settle
        header = transform(json.dumps(meta, separators=(",", ":")).encode())
        if len(header) == size:
            break
        size, offset = len(header), 16 + len(header) + 4
        entries = meta.get("arrays") if isinstance(meta, dict) else None
        for i, name in enumerate(arrays):  # the file's own order (priorities only when prioritized)
            entry = entries[i] if isinstance(entries, list) and i < len(entries) else None
            if isinstance(entry, dict) and "offset" in entry and ("arrays", i, "offset") not in pinned:
                entry["offset"] = offset
            offset += len(arrays[name])
    head = struct.pack("<8sII", b"DQNFREPL", replay_file._VERSION, len(header)) + header
    body = b"".join(bytes(arrays[name]) for name in arrays)
    crcs = [crc32c(bytes(arrays[name])) for name in arrays]
    return head + struct.pack("<I", crc32c(head)) + body + struct.pack(f"<{len(crcs)}I", *crcs) + b"DQNF-END"


# ------------------------------------------------------------------ checking


def assert_matches(batch, transitions, live):
    """Every sampled transition is bit-exactly transitions[id] (bytes, so NaNs compare too)."""
    fields = ("obs", "action", "reward", "next_obs", "terminated", "truncated")
    for i, tid in enumerate(batch.ids.tolist()):
        assert tid in live, f"sampled id {tid} is not among the stored ids {live}"
        assert tid in transitions, f"sampled id {tid} has no expected transition"
        for name, want in zip(fields, transitions[tid]):
            got, want = np.asarray(getattr(batch, name)[i]), np.asarray(want)
            assert (got.dtype, got.shape, got.tobytes()) == (want.dtype, want.shape, want.tobytes()), f"{name} of id {tid}"


def nstep_rows(buf, transitions, live) -> dict:
    """The rows an n-step buffer must sample, from one-step `transitions`.

    All bases are one-step, but a header may legitimately say n_step > 1 (the
    arrays do not depend on it). Which transition follows which is what the
    buffer's own file says (flag 8, checked against the frames on load)."""
    _, arrays = parse(replay_file.to_bytes(buf))
    flags = np.frombuffer(arrays["flags"], np.uint8)
    ref = ReferenceReplay(buf.capacity)
    ref.transitions, ref.num_envs, ref.next_id = transitions, buf.num_envs, buf.total_adds
    ref.follows = {tid: bool(flags[tid % buf.capacity] & 8) for tid in live}
    return {tid: ref.nstep(tid, buf.n_step, buf.gamma)[:6] for tid in live}


def check_samples(buf, transitions):
    live = range(buf.total_adds - len(buf), buf.total_adds)
    assert 0 <= len(buf) <= buf.capacity and live.start >= 0
    if not len(buf):
        return
    if buf.n_step > 1:
        transitions = nstep_rows(buf, transitions, live)
    for _ in range(2):
        assert_matches(buf.sample(16), transitions, live)
    if buf.n_step > 1:
        return  # window rows of n-step batches: tests/test_nstep.py
    try:
        assert_matches(buf.sample(8, window=True), transitions, live)
    except ValueError as exc:  # legitimate: a sampled transition is not a shift
        assert "window output cannot hold" in str(exc), exc


def decode_arena(arrays, buf) -> np.ndarray:
    """Every frame slot of a compressed file, decoded from the arena (a frame
    that cannot be decoded is left zero: no stored transition may name it).

    Each coded frame is a tag byte: 0 raw bytes, 1 a Blosc2 chunk, 2 a patch
    of the frame ref_back seqs earlier: (skip, length, bytes) runs, LEB128."""
    import blosc2

    arena = bytes(arrays["arena"])
    offsets = np.frombuffer(arrays["frame_offsets"], np.uint64)
    sizes = np.frombuffer(arrays["frame_sizes"], np.uint32)
    ref_back = np.frombuffer(arrays["frame_ref_back"], np.uint32)
    fb, fcap, a = int(np.prod(buf.frame_shape)) * buf.obs_dtype.itemsize, buf.frame_capacity, buf.frame_memory
    memo = {}

    def varint(p, at):
        v = shift = 0
        while True:
            b = p[at]
            v |= (b & 0x7F) << shift
            at, shift = at + 1, shift + 7
            if not b & 0x80:
                return v, at

    def frame(slot, depth=0):
        if slot in memo:
            return memo[slot]
        assert depth < 64, "a chain of patches that does not end"
        off = int(offsets[slot]) % a
        coded = arena[off : off + int(sizes[slot])]
        if coded[0] == 0:
            out = bytearray(coded[1:])
        elif coded[0] == 1:
            out = bytearray(blosc2.decompress(coded[1:]))
        else:
            out = bytearray(frame((slot - int(ref_back[slot])) % fcap, depth + 1))
            pos, at = 0, 1
            while at < len(coded):
                skip, at = varint(coded, at)
                n, at = varint(coded, at)
                pos += skip
                out[pos : pos + n] = coded[at : at + n]
                pos, at = pos + n, at + n
        assert len(out) == fb
        memo[slot] = bytes(out)
        return memo[slot]

    return frame


def decode(data, buf) -> dict:
    """The transitions a file holds, decoded in Python from its own arrays."""
    _, arrays = parse(data)
    k, cap = buf.frame_stack, buf.capacity
    if buf.compression:
        frame = decode_arena(arrays, buf)

        class Frames:  # frames[slots] for the slots a transition names
            def __len__(self):
                return buf.frame_capacity

            def __getitem__(self, seq):
                return np.stack([np.frombuffer(frame(int(s)), buf.obs_dtype).reshape(buf.frame_shape) for s in seq])

        frames = Frames()
    else:
        frames = np.frombuffer(arrays["frames"], buf.obs_dtype).reshape(-1, *buf.frame_shape)
    slots = np.frombuffer(arrays["slots"], np.uint32).reshape(-1, 2 * k)
    actions = np.frombuffer(arrays["actions"], buf.action_dtype).reshape(-1, *buf.action_shape)
    rewards = np.frombuffer(arrays["rewards"], np.float32)
    flags = np.frombuffer(arrays["flags"], np.uint8)

    def stack(seq):
        assert (seq < len(frames)).all(), f"a stored transition names frame slots {seq}: the file holds {len(frames)}"
        return frames[seq[0]] if k == 1 else np.stack(frames[seq], axis=-1 if buf.stack_last else 0)

    out = {}
    for tid in range(buf.total_adds - len(buf), buf.total_adds):
        r = tid % cap
        out[tid] = (stack(slots[r, :k]), actions[r], rewards[r], stack(slots[r, k:]), bool(flags[r] & 1), bool(flags[r] & 2))
    return out


def check_file(data, b: Base, header_only: bool):
    """Load `data`: ReplayFileError, or a buffer that works (see the module doc)."""
    try:
        buf = load(data)
    except ReplayFileError:
        return
    head = buf.total_adds
    expected = b.ref.transitions if header_only else decode(data, buf)
    ref = ReferenceReplay(buf.capacity)
    ref.transitions = {i: expected[i] for i in range(head - len(buf), head) if i in expected}
    ref.next_id = head
    check_samples(buf, ref.transitions)

    streams = copy.deepcopy(b.streams)
    for _ in range(ADDS_AFTER):
        args = streams.step()
        ref.add(*args)
        buf.add(*args)
    assert buf.total_adds == ref.next_id
    check_samples(buf, ref.transitions)

    clone = replay_file.from_bytes(replay_file.to_bytes(buf))
    assert (clone.total_adds, len(clone), clone.frames_written) == (buf.total_adds, len(buf), buf.frames_written)
    if len(buf):
        a, c = buf.sample(16), clone.sample(16)  # same PRNG state: the same batch
        for name in ("ids", "obs", "next_obs", "action", "reward", "terminated", "truncated"):
            assert np.asarray(getattr(a, name)).tobytes() == np.asarray(getattr(c, name)).tobytes(), name
    check_samples(clone, ref.transitions)


# ------------------------------------------------------ 1. header fields


def header_paths(node, prefix=()):
    """Every path into the header: sections, fields, list items."""
    if prefix:
        yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from header_paths(child, prefix + (key,))


HUGE = [0, 1, 2, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**62 - 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70]
ints = st.one_of(st.sampled_from(HUGE), st.sampled_from(HUGE).map(lambda x: -x), st.integers(-(2**70), 2**70))
dtype_strings = st.sampled_from(
    ["|u1", "|i1", "|b1", "<f4", "<i8", "<u8", "<f2", "<f8", ">f4", ">i8", "<i16", "|b2", "<U4", "|O", "V8"]
)
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=6), dtype_strings)
edge_values = st.sampled_from([[], [0], [-1], [1], [1, 1], [2**63], "", 0.0, -0.0, float("nan"), {}, [[]]])
hostile_values = st.one_of(
    scalars,
    edge_values,
    st.lists(st.one_of(ints, st.none(), st.text(max_size=2)), max_size=5),
    st.dictionaries(st.text(max_size=4), ints, max_size=2),
)
DELETE, EXTRA = object(), object()


def value_for(original):
    options = [hostile_values, st.sampled_from([DELETE, EXTRA])]
    if type(original) is int:  # near misses get past the type checks to the core's
        options.insert(0, st.integers(-3, 3).map(lambda d: original + d))
    return st.one_of(*options)


def _keys(node):
    return node.keys() if isinstance(node, dict) else range(len(node))


def apply(meta, path, value):
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if value is DELETE:
        del parent[key]
    elif value is EXTRA:
        if isinstance(parent, dict):
            parent[f"{key}_extra"] = 1
        else:
            parent.insert(key, copy.deepcopy(parent[key]))
    else:
        parent[key] = value


@FUZZ
@given(name=st.sampled_from(list(BASES)), data=st.data())
def test_hostile_header_fields(name, data):
    b = base(name)
    meta, arrays = parse(b.data)
    # Section first, so the many layout fields do not crowd out config and state.
    sections = {key: [p for p in header_paths(meta) if p[0] == key] for key in meta}
    pinned = set()
    for _ in range(data.draw(st.integers(1, 2), label="edits")):
        path = data.draw(st.sampled_from(sections[data.draw(st.sampled_from(sorted(sections)))]), label="path")
        parent = meta
        for key in path[:-1]:
            parent = parent[key] if isinstance(parent, (dict, list)) and key in _keys(parent) else None
        if not (isinstance(parent, (dict, list)) and path[-1] in _keys(parent)):
            continue  # an earlier edit removed it
        original = parent[path[-1]]
        apply(meta, path, data.draw(value_for(original), label=f"value at {path}"))
        pinned.add(path)
    check_file(assemble(meta, arrays, pinned), b, header_only=True)


# ------------------------------------------------------ 2. array contents


edits = st.tuples(
    # priorities: prioritized bases only; the arena and frame table: compressed ones
    st.sampled_from(replay_file._ARRAYS + ("priorities",) + replay_file._ARENA_ARRAYS),
    st.sampled_from(["bytes", "bit", "copy", "nudge"]),
    st.integers(0, 2**20),
    st.integers(0, 2**20),
    st.binary(min_size=1, max_size=8),
    st.integers(-3, 3),
)


def edit_array(arr: bytearray, itemsize, op, i, j, blob, delta):
    n = len(arr)
    if n == 0:
        return
    if op == "bytes":
        at = i % n
        arr[at : at + len(blob)] = blob[: n - at]
    elif op == "bit":
        arr[i % n] ^= 1 << (j % 8)
    else:  # element-wise: copy another element, or nudge one as a little-endian int
        m = n // itemsize
        dst, src = (i % m) * itemsize, (j % m) * itemsize
        if op == "copy":
            arr[dst : dst + itemsize] = arr[src : src + itemsize]
        else:
            v = (int.from_bytes(arr[dst : dst + itemsize], "little") + delta) % 2 ** (8 * itemsize)
            arr[dst : dst + itemsize] = v.to_bytes(itemsize, "little")


# Whole rows copied over others: a transition (every per-transition array)
# or an env stream (open flag and seqs). Each row stays self-consistent, so
# these reach the cross-row invariants (per-env order, streams vs transitions).
ROW_GROUPS = {"transition": ("slots", "oldest", "actions", "rewards", "flags", "priorities"),
              "stream": ("stream_open", "stream_seqs"),
              "frame": ("frame_offsets", "frame_sizes", "frame_ref_back", "frame_key_back")}
row_copies = st.tuples(st.sampled_from(sorted(ROW_GROUPS)), st.integers(0, 2**10), st.integers(0, 2**10))


@FUZZ
@given(
    name=st.sampled_from([n for n in BASES if n != "empty"]),
    changes=st.lists(edits, max_size=3),
    rows=st.lists(row_copies, max_size=2),
)
def test_hostile_array_contents(name, changes, rows):
    b = base(name)
    meta, arrays = parse(b.data)
    layout = {a["name"]: a for a in meta["arrays"]}
    for array, *edit in changes:
        if array in arrays:
            edit_array(arrays[array], np.dtype(layout[array]["dtype"]).itemsize, *edit)
    for group, src, dst in rows:
        for array in (a for a in ROW_GROUPS[group] if a in arrays):
            arr, n = arrays[array], layout[array]["shape"][0]
            w = len(arr) // n
            src, dst = src % n, dst % n
            arr[dst * w : (dst + 1) * w] = arr[src * w : (src + 1) * w]
    check_file(assemble(meta, arrays), b, header_only=False)


# ------------------------------------------------------ 3. raw damage


damage = st.tuples(
    st.sampled_from(["truncate", "flip", "overwrite", "insert", "append"]),
    st.integers(0, 2**20),
    st.integers(0, 7),
    st.binary(min_size=1, max_size=16),
)


@FUZZ
@given(name=st.sampled_from(list(BASES)), changes=st.lists(damage, min_size=1, max_size=3))
def test_raw_damage_without_fixed_checksums(name, changes):
    b = base(name)
    bad = bytearray(b.data)
    for op, pos, bit, blob in changes:
        at = pos % (len(bad) + 1)
        if op == "truncate":
            del bad[at:]
        elif op == "flip" and at < len(bad):
            bad[at] ^= 1 << bit
        elif op == "overwrite":
            bad[at : at + len(blob)] = blob
        elif op == "insert":
            bad[at:at] = blob
        elif op == "append":
            bad += blob
    if bytes(bad) == b.data:
        check_file(bytes(bad), b, header_only=True)
    else:
        with pytest.raises(ReplayFileError):
            load(bytes(bad))


# ------------------------------------------------------ 4. malformed JSON
# The header text itself, checksum right: parsing must fail cleanly too.

JSON_ATTACKS = {
    "invalid utf-8": lambda h: b"\xff" + h,
    "utf-8 BOM": lambda h: b"\xef\xbb\xbf" + h,
    "utf-16": lambda h: h.decode().encode("utf-16"),
    "trailing data": lambda h: h + b"{}",
    "empty": lambda h: b"",
    "not an object": lambda h: b"[" + h + b"]",
    "null": lambda h: b"null",
    "deep nesting": lambda h: b"[" * 200_000 + b"]" * 200_000,
    "5000-digit int": lambda h: h.replace(b'"seed":11', b'"seed":' + b"9" * 5000),
    "NaN capacity": lambda h: h.replace(b'"capacity":40', b'"capacity":NaN'),
    "Infinity frame_reserve": lambda h: h.replace(b'"frame_reserve":0.044', b'"frame_reserve":Infinity'),
    "1e400 frame_reserve": lambda h: h.replace(b'"frame_reserve":0.044', b'"frame_reserve":1e400'),
    "capacity 40.0": lambda h: h.replace(b'"capacity":40', b'"capacity":40.0'),
}


@pytest.mark.parametrize("attack", JSON_ATTACKS)
def test_malformed_json_headers_are_rejected(attack):
    b = base("k3-jumps")
    meta, arrays = parse(b.data)
    bad = assemble(meta, arrays, transform=JSON_ATTACKS[attack])
    assert bad != b.data, "the attack changed nothing"
    with pytest.raises(ReplayFileError):
        load(bad)


def facts(name):
    meta, _ = parse(base(name).data)
    s, c = meta["state"], meta["config"]
    return {
        "ring wrapped": s["head"] > c["capacity"],
        "frames wrapped": s["next_seq"] > meta["arrays"][0]["shape"][0],  # more frames written than stored
        "evicted early": s["head"] - s["tail"] < min(s["head"], c["capacity"]),
        "empty": s["head"] == 0,
    }


def test_the_bases_cover_what_they_say():
    # The situations the fuzzing relies on; untouched, each base loads and checks out.
    for name in BASES:
        check_file(base(name).data, base(name), header_only=True)
    assert facts("k3-jumps")["ring wrapped"] and not facts("k3-jumps")["frames wrapped"]
    assert facts("k1-float-wrapped")["frames wrapped"]
    assert facts("k4-short-episodes")["evicted early"] and facts("k4-short-episodes")["frames wrapped"]
    assert facts("empty")["empty"]
    assert facts("k2-prioritized")["ring wrapped"] and "priorities" in parse(base("k2-prioritized").data)[1]
    assert parse(base("k2-prioritized").data)[0]["state"]["max_priority"] > 1
    for name in ("k4-lz4-arena-wrapped", "k2-zstd-channel-last"):
        meta, arrays = parse(base(name).data)
        st_, cap = meta["state"], meta["config"]["capacity"]
        slots = np.frombuffer(arrays["slots"], np.uint32).reshape(min(st_["head"], cap), -1)
        named = {int(s) for i in range(st_["tail"], st_["head"]) for s in slots[i % cap]}
        offsets = np.frombuffer(arrays["frame_offsets"], np.uint64)
        tags = {arrays["arena"][int(offsets[s]) % meta["config"]["frame_memory"]] for s in named}
        assert {1, 2} <= tags <= {0, 1, 2}, (name, tags)  # Blosc2 keys and patches are named
    meta, _ = parse(base("k4-lz4-arena-wrapped").data)
    assert meta["state"]["arena_head"] > meta["config"]["frame_memory"]  # the arena wrapped
    assert facts("k4-lz4-arena-wrapped")["evicted early"]
