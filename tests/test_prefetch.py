"""The prefetch pipeline on the CPU (the CUDA path runs in scripts/gpu_check.py)."""

import threading
import time
from collections import deque

import numpy as np
import pytest
import torch

from dqn_fast import ReplayBuffer
from dqn_fast.prefetch import Prefetcher
from reference import EpisodeStreams, ReferenceReplay, StreamConfig, assert_batch_matches

CFG = StreamConfig(num_envs=2, frame_stack=4, frame_shape=(10, 12), palette=256, min_len=5, max_len=40)


def buffer(seed=3):
    return ReplayBuffer(300, (4, 10, 12), frame_stack=4, num_envs=2, seed=seed)


def filled_twins(adds=200):
    a, b, ref = buffer(), buffer(), ReferenceReplay(300)
    streams = EpisodeStreams(CFG, 0)
    for _ in range(adds):
        args = streams.step()
        for x in (a, b, ref):
            x.add(*args)
    return a, b, ref, streams


def as_numpy(batch):
    return {k: v.numpy().copy() for k, v in batch._asdict().items() if v is not None and k != "frames"}


@pytest.mark.parametrize("window", [True, False])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_from_an_unchanging_buffer_batches_equal_synchronous_sampling(depth, window):
    a, b, ref, _ = filled_twins()
    with Prefetcher(a, 16, "cpu", depth=depth, window=window) as pf:
        for _ in range(12):
            got = as_numpy(pf.next())
            want = b.sample(16)
            assert np.array_equal(got["ids"], want.ids)
            assert np.array_equal(got["obs"], want.obs) and np.array_equal(got["next_obs"], want.next_obs)
            assert_batch_matches(pf.slots[pf._held], ref)


def test_batches_are_drawn_when_asked_for_so_runs_are_reproducible():
    # Model: with depth d, the first next() asks for d + 1 batches, each later
    # one for one more; each is drawn from the buffer as it is at that moment.
    depth = 2
    a, b, ref, streams = filled_twins(20)
    asked = deque()
    with Prefetcher(a, 8, "cpu", depth=depth, window=True) as pf:
        for it in range(60):
            got = as_numpy(pf.next())
            asked.extend(b.sample(8).ids.copy() for _ in range(depth + 1 if it == 0 else 1))
            assert np.array_equal(got["ids"], asked.popleft())
            assert_batch_matches(pf.slots[pf._held], ref)
            args = streams.step()
            pf.barrier()
            for x in (a, b, ref):
                x.add(*args)


def test_concurrent_adds_never_yield_invalid_batches():
    buf, ref = buffer(), ReferenceReplay(300)
    streams = EpisodeStreams(CFG, 1)
    args = streams.step()
    ref.add(*args)
    buf.add(*args)
    stop = threading.Event()

    def adder():
        while not stop.is_set():
            args = streams.step()
            ref.add(*args)  # the reference first: any id sampled is known
            buf.add(*args)

    thread = threading.Thread(target=adder)
    thread.start()
    try:
        with Prefetcher(buf, 32, "cpu", depth=2, window=True) as pf:
            for _ in range(150):
                batch = pf.next()
                assert_batch_matches(batch, ref)
    finally:
        stop.set()
        thread.join()
    assert ref.next_id > 300  # the ring wrapped while sampling


def test_a_batch_stays_intact_until_the_next_call():
    a, _, ref, _ = filled_twins()
    with Prefetcher(a, 64, "cpu", depth=2) as pf:
        first = pf.next()
        snapshot = as_numpy(first)
        time.sleep(0.05)  # the sampler fills the other slots meanwhile
        assert all(np.array_equal(snapshot[k], getattr(first, k).numpy()) for k in snapshot)
        assert first.obs.data_ptr() != pf.next().obs.data_ptr()


def test_window_views_and_dtypes():
    a, _, _, _ = filled_twins()
    with Prefetcher(a, 4, "cpu", depth=1, window=True) as pf:
        b = pf.next()
        assert b.frames.shape == (4, 5, 10, 12) and b.frames.dtype == torch.uint8
        assert b.obs.shape == (4, 4, 10, 12) and torch.equal(b.obs[:, 1:], b.next_obs[:, :-1])
        assert b.reward.dtype == torch.float32 and b.terminated.dtype == torch.bool


def test_sampling_errors_reach_the_learner():
    empty = buffer()
    for depth in (0, 2):
        with Prefetcher(empty, 4, "cpu", depth=depth) as pf:
            for _ in range(2):
                with pytest.raises(ValueError, match="empty replay buffer"):
                    pf.next()
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(empty, 4, "cpu", depth=-1)
