"""Run logs: CSV always, TensorBoard when installed, a live progress bar."""

from __future__ import annotations

import csv
import math
import os
import sys
import time


class RunLogger:
    FIELDS = ["step", "seconds", "steps_per_s", "loss", "epsilon", "mean_return", "games", "updates", "buffer_len", "replay_share"]

    def __init__(self, run_dir: str, total_steps: int, first_step: int = 0, progress: bool = True, log_every: int = 0):
        self.run_dir = run_dir
        self.first_step = first_step
        self.start = time.perf_counter()
        self.last_step, self.last_time = first_step, self.start
        self.log_every = log_every
        path = os.path.join(run_dir, "progress.csv")
        new = not os.path.exists(path) or first_step == 0
        self._file = open(path, "w" if new else "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.FIELDS)
        if new:
            self._csv.writeheader()
        self._episodes = open(os.path.join(run_dir, "episodes.csv"), "w" if new else "a", newline="")
        if new:
            self._episodes.write("step,return,length\n")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
        except Exception:  # tensorboard is optional
            self._tb = None
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def due(self, step: int) -> bool:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        return self.log_every > 0 and step - self.last_step >= self.log_every

    def episode(self, step: int, ret: float, length: int) -> None:
        self._episodes.write(f"{step},{ret},{length}\n")
        if self._tb is not None:
            self._tb.add_scalar("charts/episodic_return", ret, step)

    def log(self, step: int, **values) -> dict:
        now = time.perf_counter()
        row = {
            "step": step,
            "seconds": round(now - self.start, 3),
            "steps_per_s": (step - self.last_step) / max(now - self.last_time, 1e-9),
            **values,
        }
        self.last_step, self.last_time = step, now
        self._csv.writerow(row)
        self._file.flush()
        self._episodes.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not math.isnan(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            ret = values.get("mean_return", float("nan"))
            self._bar.set_postfix(sps=f"{row['steps_per_s']:.0f}", ret=f"{ret:.1f}", loss=f"{values.get('loss', float('nan')):.4f}")
        return row

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
        self._episodes.close()
