"""Compressed replay buffers, behind the interface of bench/peers.py, for the
compression benchmark (bench/compression.py) on real Atari frames.

Each adapter is set up as its project's documentation does it for frame
stacks, adds what a trainer holds (`prepare`, untimed) and samples torch
tensors `(obs, action, reward, next_obs, terminated)` on the CPU:

  dqn_fast [lz4|zstd]   this project, `compression=None | "lz4" | "zstd"`,
                        sampled with sample_into a preallocated empty_batch
                        (window mode: the k+1 frame window, obs and next_obs
                        views of it);
  sb3-extra-buffers     CompressedReplayBuffer with zstd-3 (its recommended
                        method), lz4-frame/1 and rle-jit, configured as its
                        README's memory benchmark does: dtypes from
                        find_buffer_dtypes, optimize_memory_usage=True,
                        handle_timeout_termination=False, output_dtype="raw"
                        (obs and next_obs share one compressed row, as in
                        SB3's optimize_memory_usage);
  cpprb                 next_of="obs" + stack_compress="obs" (bench/peers.py);
  Tianshou              stack_num=4, save_only_last_obs, ignore_obs_next
                        (bench/peers.py).

`payload(peer)` gives the bytes a peer says it holds where it exposes them
(None where not); the benchmark's memory figure is RSS growth either way.
A peer that is not installed is reported missing (`missing()`), one that
cannot run here says why (`unavailable()`); tests/test_bench_compression.py
checks every adapter's samples against the stream it was fed.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Type

import numpy as np

from . import peers as P


def _core_lacks_compression() -> Optional[str]:
    from ..replay import ReplayBuffer

    try:
        ReplayBuffer(8, (4, 6, 7), np.uint8, frame_stack=4, compression="lz4")
    except TypeError as exc:  # the native core predates compression
        return f"unavailable: this dqn_fast build has no compression ({exc}); rebuild the core"
    return None


# --------------------------------------------------------------------------- this project
class DqnFastCompressed(P.DqnFast):
    """dqn_fast.ReplayBuffer(compression=...); `compression=` is passed only
    when not None, so the uncompressed row runs on any core."""

    name = "dqn_fast"
    compression: Optional[str] = None

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0, window=False, frame_memory=None,
                 sample_threads=0):
        P.Peer.__init__(self, capacity, obs_shape, frame_stack, num_envs, seed)
        from ..replay import ReplayBuffer

        kwargs = {}
        if self.compression is not None:
            kwargs["compression"] = self.compression
        if frame_memory is not None:
            kwargs["frame_memory"] = frame_memory
        self.buf = ReplayBuffer(capacity, obs_shape, self.obs_dtype, frame_stack=frame_stack, num_envs=num_envs, seed=seed,
                                sample_threads=sample_threads, **kwargs)
        self.window = window and frame_stack > 1
        self.out: Dict[int, object] = {}

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return None if cls.compression is None else _core_lacks_compression()


class DqnFastLz4(DqnFastCompressed):
    name = "dqn_fast lz4"
    compression = "lz4"


class DqnFastZstd(DqnFastCompressed):
    name = "dqn_fast zstd"
    compression = "zstd"


# --------------------------------------------------------------------------- sb3-extra-buffers
class SB3Extra(P.SB3):
    """sb3_extra_buffers.compressed.CompressedReplayBuffer: each obs stack
    compressed whole (ravelled), one Python bytes object per row and env;
    sampling decompresses 2 stacks per transition (lru-cached per batch)."""

    package = "sb3-extra-buffers"
    modules = ("sb3_extra_buffers",)
    method = ""
    optimize = True
    exactness = P.SB3Optimized.exactness  # the same row sharing as SB3's optimize_memory_usage

    def __init__(self, capacity, obs_shape, frame_stack, num_envs, seed=0):
        P.Peer.__init__(self, capacity, obs_shape, frame_stack, num_envs, seed)
        from gymnasium import spaces

        logging.getLogger("sb3_extra_buffers").setLevel(logging.ERROR)  # it prints its methods on import
        from sb3_extra_buffers.compressed import CompressedReplayBuffer, find_buffer_dtypes

        space = (spaces.Box(0, 255, self.obs_shape, np.uint8) if self.uint8
                 else spaces.Box(-np.inf, np.inf, self.obs_shape, np.float32))
        dtypes = find_buffer_dtypes(obs_shape=self.obs_shape, elem_dtype=space.dtype, compression_method=self.method)
        np.random.seed(seed)  # SB3 samples with numpy's global generator
        # 18 actions: every Atari game's full action set fits
        self.rb = CompressedReplayBuffer(capacity, space, spaces.Discrete(18), "cpu", n_envs=num_envs,
                                         optimize_memory_usage=True, handle_timeout_termination=False, dtypes=dtypes,
                                         compression_method=self.method, output_dtype="raw")

    def prepare(self, step):
        obs, action, reward, next_obs, terminated, truncated = step
        infos = [{"TimeLimit.truncated": bool(t)} for t in truncated]
        return obs, next_obs, action.reshape(-1, 1), reward, terminated | truncated, infos

    def nbytes(self):
        rows = self.rb.observations
        compressed = sum(len(b) for b in rows.flat if b is not None)
        arrays = [rows, self.rb.actions, self.rb.rewards, self.rb.dones, self.rb.timeouts]
        return compressed + sum(a.nbytes for a in arrays)


class SB3ExtraZstd(SB3Extra):
    name = "sb3-extra-buffers zstd-3"
    package = "sb3-extra-buffers[zstd]"
    modules = ("sb3_extra_buffers", "zstd")
    method = "zstd-3"


class SB3ExtraLz4(SB3Extra):
    name = "sb3-extra-buffers lz4-frame/1"
    package = "sb3-extra-buffers[lz4]"
    modules = ("sb3_extra_buffers", "lz4")
    method = "lz4-frame/1"


class SB3ExtraRleJit(SB3Extra):
    name = "sb3-extra-buffers rle-jit"
    package = "sb3-extra-buffers[numba]"
    modules = ("sb3_extra_buffers", "numba")
    method = "rle-jit"


# --------------------------------------------------------------------------- payload
def _tianshou_nbytes(batch) -> int:
    total = 0
    for value in batch.values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif hasattr(value, "values"):  # a nested Batch (info)
            total += _tianshou_nbytes(value)
    return total


def payload(peer: P.Peer) -> dict:
    """What the peer says it holds, in bytes: {"payload": total or None, ...}.
    dqn_fast: nbytes (everything reserved), and with compression the frame
    arena's budget and the bytes it holds now."""
    if isinstance(peer, P.DqnFast):
        buf = peer.buf
        out = {"payload": int(buf.nbytes), "nbytes": int(buf.nbytes), "len": len(buf)}
        for attr in ("frame_memory", "frame_memory_used"):
            value = getattr(buf, attr, None)
            out[attr] = None if value is None else int(value)
        out["compression"] = getattr(buf, "compression", None)
        return out
    if isinstance(peer, P.Tianshou):
        return {"payload": _tianshou_nbytes(peer.rb._meta), "len": len(peer.rb)}
    stored = peer.nbytes()
    return {"payload": None if stored is None else int(stored)}


def unavailable(cls: Type[P.Peer]) -> Optional[str]:
    check = getattr(cls, "unavailable", None)
    return check() if check else None


OURS: List[Type[P.Peer]] = [DqnFastCompressed, DqnFastLz4, DqnFastZstd]
COMPRESSED_OURS: List[Type[P.Peer]] = [DqnFastLz4, DqnFastZstd]  # also sampled beside every peer
OTHERS: List[Type[P.Peer]] = [SB3ExtraZstd, SB3ExtraLz4, SB3ExtraRleJit, P.CpprbCompressed, P.Tianshou]
COMPRESSION_PEERS: List[Type[P.Peer]] = OURS + OTHERS
BY_NAME: Dict[str, Type[P.Peer]] = {p.name: p for p in COMPRESSION_PEERS}
