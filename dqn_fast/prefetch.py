"""Keeps the learner fed: batches sampled ahead on a background thread into a
small ring of preallocated (pinned, with CUDA) host tensors, then copied to
the device on a side stream.

Life of a slot: the sampler thread takes a free slot, waits until the slot's
previous host-to-device copy has finished (a CUDA event), fills it with
`buffer.sample_into` (native code, GIL released) and queues it. `next()`
hands the oldest ready slot to the learner: on CUDA it copies it with
`non_blocking=True` on the copy stream, records the slot's event, and makes
the learner's stream wait for the copy; on the CPU the batch is the host
tensors themselves. A slot goes back to the sampler when the learner asks for
the following batch, so a batch stays valid until then. Frames travel as
uint8 (the k+1 frame window when the buffer stacks frames) and become floats
only inside the network, on the device.

Depth 0 samples synchronously in `next()`, through the same code otherwise.
With depth d > 0, each `next()` asks the sampler thread for one more batch
(d + 1 on the first call), to be drawn right away; `barrier()` waits until
every asked-for batch is drawn. The trainer calls it before each `add`, so a
batch is always drawn from the buffer exactly as it was when it was asked
for, whatever the thread timing: runs are reproducible. Batch n is then
asked for when the learner takes batch n - d, so it can miss the transitions
added since; from an unchanging buffer the batches equal those of
synchronous sampling with the same seed (tests/test_prefetch.py).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Optional

import torch

from .replay import Batch, ReplayBuffer

_STOP = -1


class Prefetcher:
    def __init__(self, buffer: ReplayBuffer, batch_size: int, device="cpu", depth: int = 2, window: bool = True):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.buffer = buffer
        self.device = torch.device(device)
        self.depth = depth
        self.window = window
        self.cuda = self.device.type == "cuda"
        n_slots = depth + 1
        self.slots = [buffer.empty_batch(batch_size, window, torch=True, pin_memory=self.cuda) for _ in range(n_slots)]
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in range(n_slots)]
        self._requests: "queue.Queue[int]" = queue.Queue()
        self._ready: "queue.Queue[object]" = queue.Queue()
        self._pending = 0  # batches asked for and not yet drawn
        self._drawn = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._held: Optional[int] = None  # slot the learner is using
        self._error: Optional[BaseException] = None
        self.wait_seconds = 0.0  # time the learner spent waiting for batches

    # ------------------------------------------------------------------ producer
    def _fill(self, i: int) -> None:
        if self.cuda:
            self.copied[i].synchronize()  # the slot's last copy to the device is done
        self.buffer.sample_into(self.slots[i])

    def _run(self) -> None:
        while True:
            i = self._requests.get()
            if i == _STOP:
                return
            try:
                self._fill(i)
                self._ready.put(i)
            except BaseException as exc:  # hand it to the learner, which re-raises
                self._ready.put(exc)
            with self._drawn:
                self._pending -= 1
                self._drawn.notify_all()

    def _request(self, i: int) -> None:
        with self._drawn:
            self._pending += 1
        self._requests.put(i)

    def barrier(self) -> None:
        """Returns once every batch asked for has been drawn (call before mutating the buffer)."""
        if self._pending:
            with self._drawn:
                self._drawn.wait_for(lambda: self._pending == 0)

    # ------------------------------------------------------------------ consumer
    def next(self) -> Batch:
        """The next batch, on the device; valid until the following call."""
        start = time.perf_counter()
        if self.depth == 0:
            i = 0
            self._fill(0)
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dqn_fast-prefetch", daemon=True)
                self._thread.start()
                for j in range(len(self.slots)):
                    self._request(j)
            elif self._held is not None:
                self._request(self._held)
            if self._error is not None:
                raise self._error
            item = self._ready.get()
            if isinstance(item, BaseException):
                self._held, self._error = None, item
                raise item
            i = item
        self._held = i
        batch = self._to_device(self.slots[i], i)
        self.wait_seconds += time.perf_counter() - start
        return batch

    def _to_device(self, host: Batch, i: int) -> Batch:
        names = ["action", "reward", "terminated", "truncated", "ids"] + (["frames"] if self.window else ["obs", "next_obs"])
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                moved = {n: getattr(host, n).to(self.device, non_blocking=True) for n in names}
                self.copied[i].record(self.copy_stream)
            learner = torch.cuda.current_stream(self.device)
            learner.wait_event(self.copied[i])
            for t in moved.values():  # allocated on the copy stream, used on the learner's
                t.record_stream(learner)
        else:
            moved = {n: getattr(host, n) for n in names}
        if self.window:
            frames = moved["frames"]
            k = self.buffer.frame_stack
            if k == 1:
                moved["obs"], moved["next_obs"] = frames[:, 0], frames[:, 1]
            elif self.buffer.stack_last:
                moved["obs"], moved["next_obs"] = frames[..., :k], frames[..., 1:]
            else:
                moved["obs"], moved["next_obs"] = frames[:, :k], frames[:, 1:]
        else:
            moved["frames"] = None
        return Batch(**moved)

    def close(self) -> None:
        if self._thread is not None:
            self._requests.put(_STOP)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
