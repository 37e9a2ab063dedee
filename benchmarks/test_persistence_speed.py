"""pytest-benchmark of buffer persistence: a full Atari-sized buffer (50k transitions, ~370 MB).

Run: pytest benchmarks/test_persistence_speed.py -s   (-s prints GB/s and memory)

GB/s counts the file's bytes over the median time. `save` includes the fsync: the data is
on disk when it returns. `load_warm` reads a file still in the page cache (resuming right
after a save); `load_cold` drops the file's cached pages first (posix_fadvise DONTNEED), so
its bytes come from the disk. "extra memory" is the peak resident set beyond what stays
resident afterwards (the loaded buffer's own pages) (Linux: VmHWM after a reset through /proc/self/clear_refs).
"""

import os

import pytest

from dqn_fast import ReplayBuffer
from dqn_fast.bench import peers, suite

CAPACITY = 50_000


@pytest.fixture(scope="module")
def filled():
    return suite.fill_fast(peers.DqnFast, CAPACITY, "atari", seed=0).buf


@pytest.fixture(scope="module")
def saved(filled, tmp_path_factory):
    path = tmp_path_factory.mktemp("persist") / "buf.rb"
    filled.save(path)
    return path


def report(benchmark, path, what, extra_bytes=None):
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    size = os.path.getsize(path)
    gbps = size / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update({"file_bytes": size, "GB/s": round(gbps, 3)})
    line = f"\n{what}: {size / 1e6:.0f} MB file, {gbps:.2f} GB/s (median {benchmark.stats.stats.median:.3f} s)"
    if extra_bytes is not None:
        extra_bytes = max(extra_bytes, 0)  # RSS can shrink meanwhile
        benchmark.extra_info["extra_memory_bytes"] = extra_bytes
        line += f", extra memory {extra_bytes / 1e6:.1f} MB"
    print(line)


def drop_from_page_cache(path):
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def rss_peak_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def test_save(benchmark, filled, tmp_path):
    path = tmp_path / "buf.rb"
    rss_peak_reset()
    before = rss("VmRSS:")
    benchmark.pedantic(filled.save, args=(path,), rounds=5, iterations=1)
    report(benchmark, path, "save (with fsync)", rss("VmHWM:") - before)


def test_load_warm(benchmark, saved, filled):
    loaded = []

    def load():
        loaded.append(ReplayBuffer.load(saved))

    benchmark.pedantic(load, setup=loaded.clear, rounds=5, iterations=1)
    assert loaded[0].total_adds == filled.total_adds
    report(benchmark, saved, "load (page cache)")


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_load_cold(benchmark, saved):
    holder = []

    def setup():
        holder.clear()  # free the previous round's buffer before measuring
        drop_from_page_cache(saved)
        rss_peak_reset()
        holder.append(rss("VmRSS:"))

    def load():
        holder.append(ReplayBuffer.load(saved))

    benchmark.pedantic(load, setup=setup, rounds=5, iterations=1)
    # Peak minus what stays resident with the loaded buffer: the transient extra.
    report(benchmark, saved, "load (from disk)", rss("VmHWM:") - rss("VmRSS:"))
