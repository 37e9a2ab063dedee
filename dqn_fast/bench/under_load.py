"""Sampling with one core busy: the gather must never fall below one thread.

During training the learner's torch threads and the env threads keep cores
busy, and a batch that waits for a descheduled sampling worker is slower
than one gathered by the caller alone. This measures this project's buffer
with one sampling thread against its default (a pool whose use is chosen by
measuring), quiet and then with one core kept busy by a plain busy loop in a
child process that this benchmark starts and stops itself. Rounds are time
windows, the two buffers alternating, and each ratio is the median of the
per-round ratios default / one thread.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

from . import peers as P
from .timing import interleaved, median

BUSY_LOOP = "while True: pass"


def sample_window(buf, out, seconds: float):
    def run() -> float:
        calls, start = 0, time.perf_counter()
        while True:
            buf.sample_into(out)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return calls / elapsed

    return run


class BusyCore:
    """A child process spinning on one core for the duration of the block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        time.sleep(0.5)  # let the scheduler place it
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        return False


def measure_under_load(s: dict) -> dict:
    from .suite import fill_fast  # the suite imports this module

    seconds, repeats = s.get("load_window_s", 1.0), s["repeats"]
    bufs = {
        "one_thread": fill_fast(P.DqnFast, s["capacity"], "atari", seed=1, sample_threads=1).buf,
        "default": fill_fast(P.DqnFast, s["capacity"], "atari", seed=1).buf,
    }
    out: dict = {"capacity": s["capacity"], "window_s": seconds}
    for condition in ("quiet", "one_core_busy"):
        rows = out[condition] = {}
        with BusyCore() if condition == "one_core_busy" else contextlib.nullcontext():
            for batch in (32, 256):
                fns = {name: sample_window(b, b.empty_batch(batch), seconds) for name, b in bufs.items()}
                rates = interleaved(fns, repeats, warmup=1)
                rows[str(batch)] = {
                    "one_thread_per_s": median(rates["one_thread"]),
                    "default_per_s": median(rates["default"]),
                    "default_over_one_thread": median([d / o for d, o in zip(rates["default"], rates["one_thread"])]),
                    "one_thread_repeats": rates["one_thread"],
                    "default_repeats": rates["default"],
                }
    return out
