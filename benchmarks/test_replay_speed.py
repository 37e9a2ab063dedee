"""pytest-benchmark versions of `dqn-fast bench`'s replay figures, per peer.

Run: pytest benchmarks/test_replay_speed.py --benchmark-group-by=func,param:batch
A peer that is not installed fails its tests with what to install (nothing is
silently dropped). Sizes are smaller than the report's (buffers of 5,000),
and one peer lives at a time; `dqn-fast bench` interleaves and takes ratios.
The physical reference sits beside them: memcpy and a numpy gather of the
same obs and next_obs rows from a plain (N, 4, 84, 84) array.
"""

import numpy as np
import pytest

from dqn_fast.bench import peers, suite

CAPACITY = 5_000  # torch at its default thread count, as in `dqn-fast bench`
# The report's configurations: vectors with one env, no window row for vectors,
# single-stream buffers with one env.
SAMPLE = [(p, w) for p in peers.PEERS for w in ("atari", "vector") if not (w == "vector" and p is peers.DqnFastWindow)]
ADD = [(p, w, n) for p, w in SAMPLE for n in (1, 8) if p.supports(n) is None and not (w == "vector" and n == 8)]


def peer_or_fail(cls):
    if cls.missing():
        pytest.fail(f"{cls.name}: {cls.missing()}")


@pytest.mark.parametrize("batch", [32, 256])
@pytest.mark.parametrize("peer_cls,workload", SAMPLE, ids=[f"{p.name}-{w}" for p, w in SAMPLE])
def test_sample(benchmark, peer_cls, workload, batch):
    peer_or_fail(peer_cls)
    peer = suite.fill_fast(peer_cls, CAPACITY, workload, seed=1)
    try:
        obs = benchmark(peer.sample, batch)[0]
        assert obs.shape[0] == batch
    finally:
        peer.close()


ROUND = 64  # steps per timed round


@pytest.mark.parametrize("peer_cls,workload,num_envs", ADD, ids=[f"{p.name}-{w}-{n}env" for p, w, n in ADD])
def test_add(benchmark, peer_cls, workload, num_envs):
    """Time per round of ROUND steps (divide by ROUND * num_envs for one
    transition); each round continues the same stream, prepared untimed."""
    peer_or_fail(peer_cls)
    peer = suite.make(peer_cls, CAPACITY, workload, num_envs, seed=1)
    envs = suite.fill(peer, CAPACITY + 100 * num_envs, workload, seed=2)  # wrapped: steady state; goes on

    def setup():
        return ([peer.prepare(envs.step()) for _ in range(ROUND)],), {}

    def add_round(steps):
        for a in steps:
            peer.add(*a)

    try:
        benchmark.pedantic(add_round, setup=setup, rounds=30)
        if benchmark.stats is not None:
            benchmark.extra_info["transitions_per_s"] = ROUND * num_envs / benchmark.stats.stats.median
    finally:
        peer.close()


@pytest.mark.parametrize("batch", [32, 256])
def test_numpy_take_reference(benchmark, batch):
    plain = suite.plain_frames(CAPACITY, suite.OBS_SHAPE, np.uint8)
    benchmark(suite.numpy_take_gather(plain, batch), batch)


def test_memcpy_reference(benchmark):
    src = np.ones(256 << 20, np.uint8)
    dst = np.zeros_like(src)
    benchmark(np.copyto, dst, src)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = src.nbytes / benchmark.stats.stats.median / 1e9


# prioritized (sample + update of the batch's priorities) and n-step (n=3) peers, filled one step per add
from dqn_fast.bench import features, peers_features  # noqa: E402

FEATURE_PEERS = peers_features.PER + peers_features.NSTEP


@pytest.mark.parametrize("batch", [32, 256])
@pytest.mark.parametrize("peer_cls", FEATURE_PEERS, ids=[p.name for p in FEATURE_PEERS])
def test_feature_sample(benchmark, peer_cls, batch):
    peer_or_fail(peer_cls)
    if peer_cls.unavailable():
        pytest.fail(f"{peer_cls.name}: {peer_cls.unavailable()}")
    peer = peer_cls(CAPACITY, suite.OBS_SHAPE, suite.K, 1, seed=1)
    features.fill_steps([peer], CAPACITY, seed=7)
    try:
        if peer_cls.kind == "per":
            one = features.per_round(peer, batch, 1, seed=batch)  # one sample + update per call
            benchmark(one)
        else:
            assert benchmark(peer.sample, batch)[0].shape[0] == batch
    finally:
        peer.close()
