"""Concurrency: sampling on one thread while another adds."""

import threading

import numpy as np
import pytest

from dqn_fast import ReplayBuffer
from reference import EpisodeStreams, ReferenceReplay, StreamConfig, assert_batch_matches


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_sampling_while_adding_returns_only_valid_transitions(compression):
    # Real-looking Atari frames, a small ring that wraps many times, and two
    # batch sizes so both the serial and the threaded gather run. Compressed:
    # frames that drift (patches) in an arena that fills before the ring.
    drift = 0.02 if compression else 0.0
    cfg = StreamConfig(num_envs=4, frame_stack=4, frame_shape=(84, 84), padding="zero", min_len=5, max_len=80,
                       palette=256, drift=drift)
    capacity, adds = 400, 700
    streams = EpisodeStreams(cfg, 1)
    kw = dict(compression=compression, frame_memory=1_500_000) if compression else {}
    buf = ReplayBuffer(capacity, (4, 84, 84), frame_stack=4, num_envs=4, seed=5, **kw)
    ref = ReferenceReplay(capacity)
    ref.add(*streams.step())
    buf.add(*ref_last_args(ref, cfg.num_envs))
    done = threading.Event()
    errors, batches = [], [0]

    def sampler():
        small, large = buf.empty_batch(4), buf.empty_batch(64, window=True)
        try:
            while not done.is_set():
                for out in (small, large):
                    first = buf.total_adds  # adds before the sample: the oldest id it may return
                    buf.sample_into(out)
                    head = buf.total_adds  # adds after it: every id must be below
                    assert (out.ids < head).all()
                    assert (out.ids >= first - capacity).all()
                    assert_batch_matches(out, ref)
                    batches[0] += 1
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)

    thread = threading.Thread(target=sampler)
    thread.start()
    try:
        for _ in range(adds):
            args = streams.step()
            ref.add(*args)  # the reference learns first, so any id sampled is known
            buf.add(*args)
    finally:
        done.set()
        thread.join()
    assert not errors, errors[0]
    assert batches[0] > 20
    assert len(buf) == capacity


def ref_last_args(ref, num_envs):
    items = [ref.transitions[ref.next_id - num_envs + e] for e in range(num_envs)]
    obs, action, reward, next_obs, term, trunc = zip(*items)
    return np.stack(obs), np.stack(action), np.array(reward), np.stack(next_obs), np.array(term), np.array(trunc)
