"""The replay buffer file: `ReplayBuffer.save` / `ReplayBuffer.load`.

File format (little-endian), version 3:
  preamble   8s magic, u32 format version, u32 header length N
  header     N bytes of JSON: {"config", "state", "arrays"}, then the
             u32 CRC-32C of preamble + JSON
  arrays     raw bytes, back to back, in _ARRAYS order; "arrays" in the
             header gives each one's dtype, shape, offset and nbytes. The
             rings are cut to the rows ever written.
  trailer    u32 CRC-32C of each array, then the end magic
Version 2 adds n_step, gamma, prioritized, alpha and priority_eps to the
config, max_priority to the state and, for prioritized buffers, the
"priorities" array (each slot's (p + eps)^alpha). Version 1 files still
load, as the uniform one-step buffers they were. Version 3 adds compression
and frame_memory to the config, arena_tail and arena_head to the state and,
for compressed buffers, the coded frame arena (its bytes ever written) and
the frame table (offset, size, ref_back, key_back per frame) in place of
"frames"; the core checks every coded frame before the buffer is returned.
Every byte is covered by a magic, a checksum, or an exact size check.
Loading reads nothing but JSON and raw bytes (no pickle), checks the
header, the file size and every checksum, and lets the core check the
loaded index against its invariants before the buffer is returned.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import struct
from typing import Optional, Tuple

import numpy as np

from . import _core

__all__ = ["ReplayFileError", "save", "load", "to_bytes", "from_bytes"]


class ReplayFileError(ValueError):
    """A replay buffer file that cannot be loaded: not one, truncated, corrupted,
    of an unsupported format version, or holding an inconsistent state."""


def save(buf, path) -> None:
    """Write the whole buffer to ``path``, atomically.

    Streams the arrays straight from the buffer's memory (no copy) into
    ``path + ".tmp-<random>"``, fsyncs it and renames it into place: a
    crash or an error mid-save leaves any previous file at ``path``
    intact. Holds the buffer's lock while writing, so adds on other
    threads wait and the file is one consistent snapshot.
    """
    path = os.fsdecode(path)
    tmp = f"{path}.tmp-{secrets.token_hex(8)}"
    try:
        with open(tmp, "xb", buffering=0) as f:
            _write(buf, f)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))

def load(cls, path):
    """A buffer read from a file written by ``save``.

    Reads each array straight into the new buffer's memory (extra memory:
    one small header). Raises ``ReplayFileError`` (a ``ValueError``)
    naming the problem if the file is not a replay buffer, is truncated,
    corrupted, of another format version, or inconsistent; the half-built
    buffer is then dropped. Memory-mapping is not supported: every byte is
    read anyway to verify its checksum.
    """
    path = os.fsdecode(path)
    with open(path, "rb", buffering=0) as f:
        return _read(cls, f, path)

def to_bytes(buf) -> bytes:
    """The file's bytes, in memory (pickling goes through the same checked format)."""
    f = io.BytesIO()
    _write(buf, f)
    return f.getvalue()

def _config(buf) -> dict:
    return {
        "capacity": int(buf.capacity),
        "obs_shape": list(buf.obs_shape),
        "obs_dtype": buf.obs_dtype.str,
        "frame_stack": int(buf.frame_stack),
        "num_envs": int(buf.num_envs),
        "action_shape": list(buf.action_shape),
        "action_dtype": buf.action_dtype.str,
        "stack_axis": -1 if buf.stack_last else 0,
        "frame_reserve": buf.frame_reserve,
        "sample_threads": buf.sample_threads,
        "seed": buf.seed,
        "n_step": int(buf.n_step),
        "gamma": float(buf.gamma),
        "prioritized": bool(buf.prioritized),
        "alpha": float(buf.alpha),
        "priority_eps": float(buf.priority_eps),
        "compression": buf.compression,
        "frame_memory": int(buf.frame_memory) if buf.compression else None,
    }


def _array_names(buf) -> tuple:
    names = _ARRAYS
    if buf.prioritized:
        names = names[:6] + ("priorities",) + names[6:]
    if buf.compression:
        names = _ARENA_ARRAYS + names[1:]
    return names

def _layout(buf, arrays: dict, offset: int) -> list:
    """Each array's name, dtype, shape, offset and nbytes, as JSON values."""
    k, ne = buf.frame_stack, buf.num_envs
    items = {
        "frames": (buf.obs_dtype, buf.frame_shape),
        "arena": (np.dtype(np.uint8), ()),
        "frame_offsets": (np.dtype(np.uint64), ()),
        "frame_sizes": (np.dtype(np.uint32), ()),
        "frame_ref_back": (np.dtype(np.uint32), ()),
        "frame_key_back": (np.dtype(np.uint32), ()),
        "slots": (np.dtype(np.uint32), (2 * k,)),
        "oldest": (np.dtype(np.int64), ()),
        "actions": (buf.action_dtype, buf.action_shape),
        "rewards": (np.dtype(np.float32), ()),
        "flags": (np.dtype(np.uint8), ()),
        "priorities": (np.dtype(np.float64), ()),
        "stream_open": (np.dtype(np.uint8), ()),
        "stream_seqs": (np.dtype(np.int64), (k,)),
    }
    layout = []
    for name in _array_names(buf):
        dtype, row = items[name]
        nbytes = int(arrays[name].nbytes)
        rows = ne if name.startswith("stream") else nbytes // (dtype.itemsize * int(np.prod(row, dtype=np.int64)))
        layout.append(
            {"name": name, "dtype": dtype.str, "shape": [rows, *row], "offset": offset, "nbytes": nbytes}
        )
        offset += nbytes
    return layout

def _write(buf, f) -> None:
    def write(state, arrays):
        arrays = dict(arrays, stream_open=state["stream_open"], stream_seqs=state["stream_seqs"])
        meta = {
            "config": _config(buf),
            "state": {key: int(state[key]) for key in ("next_seq", "head", "tail")},
            "arrays": None,
        }
        meta["state"]["rng"] = [int(x) for x in state["rng"]]
        meta["state"]["max_priority"] = float(state["max_priority"])
        meta["state"]["arena_tail"] = int(state["arena_tail"])
        meta["state"]["arena_head"] = int(state["arena_head"])
        # The header's length depends on the offsets it lists: settle it.
        size = 0
        while True:
            meta["arrays"] = _layout(buf, arrays, _PREAMBLE.size + size + 4)
            header = json.dumps(meta, separators=(",", ":")).encode()
            if len(header) == size:
                break
            size = len(header)
        head = _PREAMBLE.pack(_MAGIC, _VERSION, len(header)) + header
        _write_all(f, head + struct.pack("<I", _core.crc32c(head)))
        crcs = [_write_array(f, arrays[name]) for name in _array_names(buf)]
        _write_all(f, struct.pack(f"<{len(crcs)}I", *crcs) + _END)

    buf._snapshot(write)


def _read(cls, f, name: str):
    def bad(what: str) -> ReplayFileError:
        return ReplayFileError(f"{name}: {what}")

    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    pre = _read_exact(f, _PREAMBLE.size)
    if len(pre) < _PREAMBLE.size:
        raise bad(f"truncated: {size} bytes is too short for a replay buffer file")
    magic, version, header_len = _PREAMBLE.unpack(pre)
    if magic != _MAGIC:
        raise bad("not a dqn_fast replay buffer file (wrong magic bytes)")
    if version not in _READS:
        raise bad(f"format version {version} is not supported (this dqn_fast reads versions 1 to {_VERSION})")
    if header_len > _MAX_HEADER:
        raise bad(f"header length {header_len} is implausible (at most {_MAX_HEADER})")
    raw = _read_exact(f, header_len + 4)
    if len(raw) < header_len + 4:
        raise bad("truncated inside the header")
    if _core.crc32c(pre + raw[:header_len]) != struct.unpack("<I", raw[header_len:])[0]:
        raise bad("header checksum mismatch: the file is corrupted")
    try:
        meta = json.loads(raw[:header_len].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise bad(f"header is not valid JSON: {exc}") from None
    try:
        config, state = _check_meta(meta, version)
    except ValueError as exc:
        raise bad(f"header: {exc}") from None

    from .replay import ReplayBuffer

    buf = cls.__new__(cls)
    try:
        ReplayBuffer.__init__(buf, **config)
    except (TypeError, ValueError, MemoryError) as exc:
        error = bad(f"header: invalid config: {exc}")
    else:
        error = None
    if error is not None:
        del buf  # never constructed: no frame of this traceback may hold it
        raise error
    arrays = dict(buf._load_views(state["next_seq"], state["head"], state["arena_head"]))
    arrays["stream_open"] = np.empty(buf.num_envs, np.uint8)
    arrays["stream_seqs"] = np.empty((buf.num_envs, buf.frame_stack), np.int64)
    start = _PREAMBLE.size + header_len + 4
    layout = _layout(buf, arrays, start)
    if meta["arrays"] != layout:
        raise bad("header: the array list does not match the config and state")
    names = _array_names(buf)
    end_crc = struct.Struct(f"<{len(names)}I")
    trailer = end_crc.size + len(_END)
    expected = start + sum(a["nbytes"] for a in layout) + trailer
    if size < expected:
        raise bad(f"truncated: {size} bytes, expected {expected}")
    if size > expected:
        raise bad(f"{size - expected} unexpected bytes after the end ({expected} expected)")
    f.seek(expected - trailer)
    tail = _read_exact(f, trailer)
    if tail[end_crc.size :] != _END:
        raise bad("wrong end marker: the file is corrupted")
    f.seek(start)
    for array_name, want in zip(names, end_crc.unpack(tail[: end_crc.size])):
        got = _read_array(f, arrays[array_name])
        if got is None:
            raise bad(f"truncated inside array {array_name!r} (did the file change while loading?)")
        if got != want:
            raise bad(f"checksum mismatch in array {array_name!r}: the file is corrupted")
    try:
        buf._restore(
            state["next_seq"], state["head"], state["tail"], state["rng"],
            arrays["stream_open"], arrays["stream_seqs"], state["max_priority"],
            state["arena_tail"], state["arena_head"],
        )
    except ValueError as exc:
        raise bad(f"inconsistent buffer state: {exc}") from None
    return buf


_MAGIC, _END, _VERSION = b"DQNFREPL", b"DQNF-END", 3
_READS = (1, 2, 3)
_PREAMBLE = struct.Struct("<8sII")
_ARRAYS = ("frames", "slots", "oldest", "actions", "rewards", "flags", "stream_open", "stream_seqs")
_ARENA_ARRAYS = ("arena", "frame_offsets", "frame_sizes", "frame_ref_back", "frame_key_back")
_MAX_HEADER = 1 << 20
_CHUNK = 4 << 20  # checksum a chunk, then write it while it is still in cache
_COUNT_MAX = 1 << 62  # the core's limit for its counters
_CONFIG_TYPES = {
    "capacity": int, "obs_shape": list, "obs_dtype": str, "frame_stack": int, "num_envs": int,
    "action_shape": list, "action_dtype": str, "stack_axis": int, "frame_reserve": float,
    "sample_threads": int, "seed": int,
}
_CONFIG_TYPES_V2 = dict(_CONFIG_TYPES, n_step=int, gamma=float, prioritized=bool, alpha=float, priority_eps=float)
_CONFIG_TYPES_V3 = dict(_CONFIG_TYPES_V2, compression=(str, type(None)), frame_memory=(int, type(None)))


def _check_meta(meta, version: int = _VERSION) -> Tuple[dict, dict]:
    """The config and state of a parsed header, every field's type checked."""
    types = _CONFIG_TYPES_V3 if version >= 3 else _CONFIG_TYPES_V2 if version == 2 else _CONFIG_TYPES

    def keys(d, want, what):
        if not isinstance(d, dict) or set(d) != set(want):
            raise ValueError(f"{what} must be an object with keys {sorted(want)}")

    keys(meta, ("config", "state", "arrays"), "the header")
    config, state = meta["config"], meta["state"]
    keys(config, types, "config")
    for key, kind in types.items():
        value = config[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if type(value) not in kinds or (kind is list and not all(type(d) is int for d in value)):
            what = "a list of ints" if kind is list else " or ".join(k.__name__ for k in kinds)
            raise ValueError(f"config.{key} must be {what}, got {value!r}")
    for key in ("obs_dtype", "action_dtype"):
        # Only plain numeric type strings reach numpy (it parses far more).
        if not (re.fullmatch(r"[<>|][biuf](1|2|4|8|16)", config[key]) and _dtype_str(config[key]) == config[key]):
            raise ValueError(f"config.{key} must be a bool, integer or float dtype string, got {config[key]!r}")
    config = dict(config, obs_dtype=np.dtype(config["obs_dtype"]), action_dtype=np.dtype(config["action_dtype"]))
    want = ("next_seq", "head", "tail", "rng") + (("max_priority",) if version >= 2 else ())
    keys(state, want + (("arena_tail", "arena_head") if version >= 3 else ()), "state")
    for key in ("next_seq", "head", "tail") + (("arena_tail", "arena_head") if version >= 3 else ()):
        if type(state[key]) is not int or not 0 <= state[key] < _COUNT_MAX:
            raise ValueError(f"state.{key} must be an int in [0, 2**62), got {state[key]!r}")
    rng = state["rng"]
    if not (isinstance(rng, list) and len(rng) == 4 and all(type(x) is int and 0 <= x < 2**64 for x in rng)):
        raise ValueError("state.rng must be 4 ints in [0, 2**64)")
    if version >= 2:
        if type(state["max_priority"]) is not float:
            raise ValueError(f"state.max_priority must be a float, got {state['max_priority']!r}")
    else:
        state = dict(state, max_priority=1.0)
    if version < 3:
        state = dict(state, arena_tail=0, arena_head=0)
    return config, state


def _dtype_str(text: str) -> Optional[str]:
    """numpy's spelling of a dtype string, None where numpy has no such type ('<i16', '|b2')."""
    try:
        return np.dtype(text).str
    except (TypeError, ValueError):
        return None


def from_bytes(data: bytes):
    """A buffer from `to_bytes` output (what unpickling calls)."""
    from .replay import ReplayBuffer

    return _read(ReplayBuffer, io.BytesIO(data), "pickled ReplayBuffer")


def _write_all(f, data) -> None:
    view = memoryview(data)
    while view.nbytes:
        view = view[f.write(view) :]


def _write_array(f, array) -> int:
    """Writes the array's bytes in chunks; returns their CRC-32C."""
    view, crc = memoryview(array).cast("B"), 0
    for i in range(0, view.nbytes, _CHUNK):
        chunk = view[i : i + _CHUNK]
        crc = _core.crc32c(chunk, crc)
        _write_all(f, chunk)
    return crc


def _read_exact(f, n: int) -> bytes:
    out = bytearray(n)
    got = _readinto_all(f, memoryview(out))
    return bytes(out[:got])


def _readinto_all(f, view) -> int:
    got = 0
    while got < view.nbytes:
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _read_array(f, array) -> Optional[int]:
    """Fills the array from the file in place; its CRC-32C, None if the file ends first."""
    view, crc = memoryview(array).cast("B"), 0
    for i in range(0, view.nbytes, _CHUNK):
        chunk = view[i : i + _CHUNK]
        if _readinto_all(f, chunk) < chunk.nbytes:
            return None
        crc = _core.crc32c(chunk, crc)
    return crc


def _fsync_dir(path: str) -> None:
    """Makes a rename in `path` durable (where the platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
