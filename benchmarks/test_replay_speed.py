"""pytest-benchmark versions of the replay figures (`dqn-fast bench` is the report).

Run: pytest benchmarks/ --benchmark-group-by=param:batch
Sampling is measured next to the physical reference, a numpy gather of the
same obs and next_obs rows from a plain (N, 4, 84, 84) array.
"""

import numpy as np
import pytest

from dqn_fast import ReplayBuffer
from dqn_fast.bench.replay import FRAME, K, AtariEnvs, atari_buffer, filled_atari_buffer, numpy_take_gather

CAPACITY = 20_000


@pytest.fixture(scope="module")
def filled():
    return filled_atari_buffer(CAPACITY)


@pytest.fixture(scope="module")
def plain():
    arr = np.empty((CAPACITY, K, *FRAME), np.uint8)
    arr[:] = 1  # touch every page
    return arr


@pytest.mark.parametrize("batch", [32, 256])
def test_numpy_take_reference(benchmark, plain, batch):
    benchmark(numpy_take_gather(plain, batch))


@pytest.mark.parametrize("window", [False, True], ids=["obs_next", "window"])
@pytest.mark.parametrize("batch", [32, 256])
def test_sample_into(benchmark, filled, batch, window):
    out = filled.empty_batch(batch, window=window)
    benchmark(filled.sample_into, out)
    assert out.ids.max() < filled.total_adds


@pytest.mark.parametrize("batch", [32, 256])
def test_sample_into_torch(benchmark, filled, batch):
    pytest.importorskip("torch")
    out = filled.empty_batch(batch, window=True, torch=True)
    benchmark(filled.sample_into, out)


@pytest.mark.parametrize("num_envs", [1, 8])
def test_add_atari(benchmark, num_envs):
    buf = atari_buffer(4000, num_envs=num_envs)
    envs = AtariEnvs(num_envs, seed=1)
    steps = [envs.step() for _ in range(200)]  # one stream, replayed in order
    if num_envs == 1:
        steps = [(o[0], int(a[0]), float(r[0]), n[0], bool(t[0]), bool(u[0])) for o, a, r, n, t, u in steps]
    it = iter(range(0))

    def add_one():
        nonlocal it
        i = next(it, None)
        if i is None:
            it = iter(range(len(steps)))
            i = next(it)
        buf.add(*steps[i])

    benchmark(add_one)


def test_add_cartpole(benchmark):
    buf = ReplayBuffer(10_000, (4,), np.float32, seed=0)
    obs = np.zeros(4, np.float32)
    nxt = np.ones(4, np.float32)
    benchmark(buf.add, obs, 0, 1.0, nxt, False, False)
