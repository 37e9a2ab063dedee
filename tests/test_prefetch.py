"""The prefetch pipeline on the CPU (the CUDA path runs in scripts/gpu_check.py)."""

import threading
import time
from collections import deque

import numpy as np
import pytest
import torch

from dqn_fast import ReplayBuffer
from dqn_fast.prefetch import Prefetcher
from dqn_fast.replay import window_next_obs
from reference import EpisodeStreams, ReferenceReplay, StreamConfig, assert_batch_matches, assert_nstep_batch_matches

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


# ------------------------------------------------------------ n-step windows
@pytest.mark.parametrize("k, stack_last", [(1, False), (4, False), (4, True)])  # k = 1 never stacks last
def test_window_next_obs_cuts_each_row_at_its_own_start(k, stack_last):
    n, frame = 3, (2, 3)
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (5, k + n, *frame), dtype=torch.uint8, generator=g)
    start = torch.tensor([1, 3, 2, 1, 3])
    if stack_last:
        frames = frames.movedim(1, -1)
    got = window_next_obs(frames, start, k, stack_last=stack_last)
    for b in range(5):
        s = int(start[b])
        if k == 1:
            want = frames[b, s]  # obs without a stack axis
        else:
            want = frames[b, ..., s : s + k] if stack_last else frames[b, s : s + k]
        assert torch.equal(got[b], want), b


def nstep_buffer(seed=3, n=3, prioritized=False):
    return ReplayBuffer(300, (4, 10, 12), frame_stack=4, num_envs=2, seed=seed, n_step=n, gamma=0.9, prioritized=prioritized)


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("window", [True, False])
def test_n_step_batches_match_the_reference_through_the_prefetcher(depth, window):
    buf, ref = nstep_buffer(), ReferenceReplay(300)
    streams = EpisodeStreams(CFG, 4)
    for _ in range(120):
        args = streams.step()
        buf.add(*args)
        ref.add(*args)
    with Prefetcher(buf, 32, "cpu", depth=depth, window=window) as pf:
        for _ in range(10):
            b = pf.next()
            if window:
                assert b.frames.shape == (32, 4 + 3, 10, 12)
                assert b.next_start.min() >= 1 and b.next_start.max() <= 3
            assert_nstep_batch_matches(b, ref, 3, 0.9)
            if depth == 0:
                # Synchronous batches see every add. (A prefetched one was drawn
                # before the adds since, when the newest windows were shorter.)
                args = streams.step()
                buf.add(*args)
                ref.add(*args)


# ------------------------------------------------------------ priorities
CAP, B = 64, 8


def prioritized_twins(seed=5):
    """Two prioritized buffers with the same seed and the same 64 transitions."""
    # (a generous frame reserve: each episode start stores an extra frame, and all 64 must stay)
    make = lambda: ReplayBuffer(CAP, (3,), np.float32, seed=seed, prioritized=True, alpha=0.7, frame_reserve=0.5)
    a, b = make(), make()
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(1, 3)).astype(np.float32)
    for t in range(CAP):
        nxt = rng.normal(size=(1, 3)).astype(np.float32)
        args = (obs, np.array([t % 2]), np.array([1.0], np.float32), nxt, np.array([t % 9 == 8]), np.array([False]))
        a.add(*args)
        b.add(*args)
        obs = nxt
    return a, b


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_priorities_reach_the_buffer_one_update_late(depth):
    """The documented lag: batch j is drawn from priorities that include
    updates 0 .. j - depth - 1. The model: next() call u applies update u - 1,
    then draws (depth + 1 batches on the first call, one after)."""
    a, model = prioritized_twins()
    stored = np.arange(CAP)
    rng = np.random.default_rng(1)
    drawn = deque()  # the model's batches, in the order they were asked for
    previous = None  # (ids, priorities) of the last update
    changes = 0
    with Prefetcher(a, B, "cpu", depth=depth, window=False) as pf:
        for u in range(25):
            beta = 0.4 + 0.02 * u
            before = a.probabilities(stored)
            got = pf.next(beta)
            if previous is not None:
                model.update_priorities(*previous)
            drawn.extend(model.sample(B, beta=beta) for _ in range(depth + 1 if u == 0 else 1))
            want = drawn.popleft()
            assert np.array_equal(got.ids.numpy(), want.ids), u
            assert np.array_equal(got.weights.numpy(), want.weights), u
            pf.barrier()
            now = a.probabilities(stored)
            assert np.array_equal(now, model.probabilities(stored)), f"after next() {u} the buffer holds updates 0..{u - 1}"
            changes += not np.array_equal(now, before)

            p = torch.from_numpy(rng.uniform(0.0, 3.0, B).astype(np.float32))
            pf.update_priorities(p)
            pf.barrier()
            # handed back, not applied yet: the next draw applies it
            assert np.array_equal(a.probabilities(stored), now), f"update {u} must wait for next()"
            assert np.array_equal(pf.pending_priorities()[0], got.ids.numpy())
            assert np.array_equal(pf.pending_priorities()[1], p.numpy())
            previous = (got.ids.numpy().copy(), p.numpy().copy())
    assert changes == 24  # every next() after the first applied one update
    assert not np.allclose(a.probabilities(stored), 1 / CAP)


def test_priority_handback_errors_are_clear():
    filled = filled_twins(20)[0]
    with Prefetcher(filled, 4, "cpu", depth=0) as pf:
        pf.next()
        with pytest.raises(ValueError, match="prioritized buffer"):
            pf.update_priorities(torch.ones(4))
        assert pf.pending_priorities() is None
    a, _ = prioritized_twins()
    with Prefetcher(a, B, "cpu", depth=1, window=False) as pf:
        with pytest.raises(ValueError, match="after next"):
            pf.update_priorities(torch.ones(B))
        pf.next()
        with pytest.raises(ValueError, match=rf"shape \({B},\)"):
            pf.update_priorities(torch.ones(B + 1))
        with pytest.raises(TypeError, match="torch tensor"):
            pf.update_priorities(np.ones(B))
        assert pf.pending_priorities() is None
        pf.update_priorities(torch.full((B,), float("nan")))
        # A NaN loss stops training instead of poisoning the tree. The update is
        # applied by the job the next call asks for, so its error reaches the
        # learner with that job's batch: depth (here 1) calls later at most.
        with pytest.raises(ValueError, match="finite"):
            for _ in range(2):
                pf.next()
