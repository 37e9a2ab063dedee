"""Keeps the learner fed: batches sampled ahead on a background thread into a
small ring of preallocated (pinned, with CUDA) host tensors, then copied to
the device on a side stream; with prioritized replay, carries the learner's
new priorities back to the buffer the same way.

Life of a slot: the sampler thread takes a free slot, waits until the slot's
previous host-to-device copy has finished (a CUDA event), fills it with
`buffer.sample_into` (native code, GIL released) and queues it. `next()`
hands the oldest ready slot to the learner: on CUDA it copies it with
`non_blocking=True` on the copy stream, records the slot's event, and makes
the learner's stream wait for the copy; on the CPU the batch is the host
tensors themselves. A slot goes back to the sampler when the learner asks for
the following batch, so a batch stays valid until then. Frames travel as
uint8 (the k+n frame window when the buffer stacks frames) and become floats
only inside the network, on the device. With n-step windows (n > 1) each row's
next_obs starts at its own offset, `next_start`; it is cut out of the frames
on the device with one gather, so no value travels back to the host.

Depth 0 samples synchronously in `next()`, through the same code otherwise.
With depth d > 0, each `next()` asks the sampler thread for one more batch
(d + 1 on the first call), to be drawn right away; `barrier()` waits until
every asked-for batch is drawn. The trainer calls it before each `add`, so a
batch is always drawn from the buffer exactly as it was when it was asked
for, whatever the thread timing: runs are reproducible. Batch n is then
asked for when the learner takes batch n - d, so it can miss the transitions
added since; from an unchanging buffer the batches equal those of
synchronous sampling with the same seed (tests/test_prefetch.py). The
importance-weight exponent `beta` of a batch is the one passed to the
`next()` call that asked for it.

Priorities (prioritized buffers): after the update on the batch of `next()`
call u (batch u), the learner passes that batch's new priorities (|TD error|,
on the device) to `update_priorities`. They are copied, non-blocking on
CUDA, into the slot's pinned host buffer and an event is recorded on the
learner's stream: the learner never waits for them. The slot's next job on
the sampler thread first waits for that event, applies
`buffer.update_priorities(ids, priorities)`, and only then draws into the
slot. That job is asked for by `next()` call u + 1. Hence, like the actors of
Ape-X (Horgan et al., 2018), the sampler runs a little behind the learner:

    batch j is drawn from priorities that include updates 0 .. j - d - 1 and
    none of updates j - d .. j - 1 (batches 0 .. d: no update at all).

With depth 0 that is every earlier update (j - 1), and `next()` waits for the
copy, synchronously. The priorities of the last batch before `close()` are
never applied; `pending_priorities()` returns them (the trainer keeps them in
its checkpoint). Updates are applied in order, in the same jobs that
`barrier()` waits for, so runs stay reproducible.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Optional, Tuple

import torch

from .replay import Batch, ReplayBuffer, window_next_obs

_STOP = -1


class Prefetcher:
    def __init__(self, buffer: ReplayBuffer, batch_size: int, device="cpu", depth: int = 2, window: bool = True):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.buffer = buffer
        self.device = torch.device(device)
        self.depth = depth
        self.window = window
        self.batch_size = batch_size
        self.cuda = self.device.type == "cuda"
        self.prioritized = bool(getattr(buffer, "prioritized", False))
        self.n_step = int(getattr(buffer, "n_step", 1))
        n_slots = depth + 1
        self.slots = [buffer.empty_batch(batch_size, window, torch=True, pin_memory=self.cuda) for _ in range(n_slots)]
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in range(n_slots)]
        if self.prioritized:
            # Where each slot's new priorities land, and whether some wait there.
            self._prios = [torch.empty(batch_size, dtype=torch.float32, pin_memory=self.cuda) for _ in range(n_slots)]
            self._prios_copied = [torch.cuda.Event() for _ in range(n_slots)] if self.cuda else None
            self._prios_due = [False] * n_slots
        self._requests: "queue.Queue[Tuple[int, float]]" = queue.Queue()
        self._ready: "queue.Queue[object]" = queue.Queue()
        self._pending = 0  # batches asked for and not yet drawn
        self._drawn = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._held: Optional[int] = None  # slot the learner is using
        self._error: Optional[BaseException] = None
        self.wait_seconds = 0.0  # time the learner spent waiting for batches

    # ------------------------------------------------------------------ producer
    def _fill(self, i: int, beta: float) -> None:
        if self.prioritized:
            if self._prios_due[i]:
                # The slot still holds the ids of the batch these priorities are for.
                if self.cuda:
                    self._prios_copied[i].synchronize()
                self._prios_due[i] = False
                self.buffer.update_priorities(self.slots[i].ids, self._prios[i])
        if self.cuda:
            self.copied[i].synchronize()  # the slot's last copy to the device is done
        if self.prioritized:
            self.buffer.sample_into(self.slots[i], beta=beta)
        else:
            self.buffer.sample_into(self.slots[i])

    def _run(self) -> None:
        while True:
            i, beta = self._requests.get()
            if i == _STOP:
                return
            try:
                self._fill(i, beta)
                self._ready.put(i)
            except BaseException as exc:  # hand it to the learner, which re-raises
                self._ready.put(exc)
            with self._drawn:
                self._pending -= 1
                self._drawn.notify_all()

    def _request(self, i: int, beta: float) -> None:
        with self._drawn:
            self._pending += 1
        self._requests.put((i, beta))

    def barrier(self) -> None:
        """Returns once every batch asked for has been drawn (call before mutating the buffer)."""
        if self._pending:
            with self._drawn:
                self._drawn.wait_for(lambda: self._pending == 0)

    # ------------------------------------------------------------------ consumer
    def next(self, beta: float = 0.4) -> Batch:
        """The next batch, on the device; valid until the following call.

        beta: importance-weight exponent for the batches this call asks for
        (prioritized buffers; see the module docstring for which those are).
        """
        start = time.perf_counter()
        beta = float(beta)
        if self.depth == 0:
            i = 0
            self._fill(0, beta)
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dqn_fast-prefetch", daemon=True)
                self._thread.start()
                for j in range(len(self.slots)):
                    self._request(j, beta)
            elif self._held is not None:
                self._request(self._held, beta)
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

    def update_priorities(self, priorities: torch.Tensor) -> None:
        """New priorities for the batch of the last `next()`, one per row, on
        any device; applied to the buffer before the slot's next draw (see the
        module docstring). Does not wait for the device."""
        if not self.prioritized:
            raise ValueError("update_priorities needs a prioritized buffer (ReplayBuffer(..., prioritized=True))")
        if self._held is None:
            raise ValueError("update_priorities comes after next(): there is no batch to update yet")
        if not isinstance(priorities, torch.Tensor):
            raise TypeError(f"priorities must be a torch tensor, got {type(priorities).__name__}")
        if tuple(priorities.shape) != (self.batch_size,):
            raise ValueError(f"priorities must have shape ({self.batch_size},), one per row of the batch, got {tuple(priorities.shape)}")
        i = self._held
        if self.cuda and priorities.is_cuda:
            self._prios[i].copy_(priorities.detach(), non_blocking=True)  # on the learner's stream, after the update
            self._prios_copied[i].record(torch.cuda.current_stream(self.device))
        else:
            self._prios[i].copy_(priorities.detach())
        self._prios_due[i] = True

    def pending_priorities(self):
        """(ids, priorities) as numpy arrays handed to update_priorities and not
        yet applied to the buffer, or None. Waits for their copy."""
        i = self._held
        if not self.prioritized or i is None or not self._prios_due[i]:
            return None
        if self.cuda:
            self._prios_copied[i].synchronize()
        return self.slots[i].ids.numpy().copy(), self._prios[i].numpy().copy()

    def _to_device(self, host: Batch, i: int) -> Batch:
        names = ["action", "reward", "terminated", "truncated", "ids"]
        names += [n for n in ("weights", "discount") if getattr(host, n, None) is not None]
        split = self.window and self.n_step > 1  # rows' next_obs start at their own offsets
        names += (["frames"] + (["next_start"] if split else [])) if self.window else ["obs", "next_obs"]
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
            last = self.buffer.stack_last
            if k == 1:
                moved["obs"] = frames[:, 0]
            else:
                moved["obs"] = frames[..., :k] if last else frames[:, :k]
            if split:
                moved["next_obs"] = window_next_obs(frames, moved["next_start"], k, last)
            elif k == 1:
                moved["next_obs"] = frames[:, 1]
            else:
                moved["next_obs"] = frames[..., 1:] if last else frames[:, 1:]
        else:
            moved["frames"] = None
        return Batch(**moved)

    def close(self) -> None:
        if self._thread is not None:
            self._requests.put((_STOP, 0.0))
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
