"""All GPU checks and GPU benchmarks in one run (a few minutes on one GPU).

1. The CUDA path of the prefetcher (pinned slots, non-blocking copies on a
   side stream, CUDA events) gives exactly the batches of the CPU path on the
   same seed, with adds in between, for depths 0 and 2, window on and off.
2. Replay to GPU: batches/s of ready-on-device batches (batch 32 and 256)
   from the Prefetcher (depth 0 and 2), SB3's ReplayBuffer.sample(device=cuda)
   and a numpy take + torch copy, all from the same Atari-shaped stream.
3. Learner: Nature-CNN updates/s fed by the Prefetcher at depth 0 vs 2.
4. End to end (needs gymnasium + ale-py, and stable-baselines3 for the
   baseline): Atari training steps/s of `dqn_fast.train` vs the CleanRL-style
   loop, interleaved, and of dqn_fast at prefetch depth 0 vs 2.

Usage: python scripts/gpu_check.py [--out DIR]   (writes DIR/gpu_results.json)
       python scripts/gpu_check.py --dry-run      (tiny sizes on the CPU: checks the script itself)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from dqn_fast import ReplayBuffer
from dqn_fast.bench.streams import AtariEnvs
from dqn_fast.prefetch import Prefetcher

DEVICE = "cuda"
SMALL = False  # --dry-run: tiny sizes


def sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def check_cuda_matches_cpu() -> dict:
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (64, 84, 84), dtype=np.uint8)
    checked = 0
    for depth in (0, 2):
        for window in (True, False):
            bufs = [ReplayBuffer(5000, (4, 84, 84), frame_stack=4, num_envs=4, seed=11) for _ in range(2)]
            frames = pool[rng.integers(0, 64, (400, 4))]  # (t, env, H, W)

            def add(t):
                obs = np.stack([frames[t + j] for j in range(4)], axis=1)
                nxt = np.stack([frames[t + 1 + j] for j in range(4)], axis=1)
                for b in bufs:
                    b.add(obs, np.zeros(4, np.int64), np.ones(4, np.float32), nxt, np.zeros(4, bool), np.zeros(4, bool))

            for t in range(100):
                add(t)
            gpu = Prefetcher(bufs[0], 32, DEVICE, depth=depth, window=window)
            cpu = Prefetcher(bufs[1], 32, "cpu", depth=depth, window=window)
            if DEVICE != "cpu":
                assert all(s.ids.is_pinned() for s in gpu.slots), "host slots must be pinned"
            for t in range(100, 300):
                g, c = gpu.next(), cpu.next()
                assert g.obs.device.type == DEVICE
                for name in ("obs", "next_obs", "action", "reward", "terminated", "truncated", "ids"):
                    assert torch.equal(getattr(g, name).cpu(), getattr(c, name)), (depth, window, name)
                checked += 1
                gpu.barrier(), cpu.barrier()
                add(t)
            gpu.close(), cpu.close()
    return {"batches_compared": checked, "ok": True}


def filled(capacity: int, steps: int, num_envs: int = 8) -> tuple:
    """Our buffer and the same stream in an SB3 buffer (None without SB3)."""
    buf = ReplayBuffer(capacity, (4, 84, 84), frame_stack=4, num_envs=num_envs, seed=0)
    sb3 = None
    if importlib.util.find_spec("stable_baselines3"):
        from gymnasium import spaces
        from stable_baselines3.common.buffers import ReplayBuffer as SB3Buffer

        sb3 = SB3Buffer(capacity // num_envs, spaces.Box(0, 255, (4, 84, 84), np.uint8), spaces.Discrete(6), DEVICE,
                        n_envs=num_envs, optimize_memory_usage=True, handle_timeout_termination=False)
    envs = AtariEnvs(num_envs, seed=0)
    for _ in range(steps):
        obs, action, reward, nxt, term, trunc = envs.step()
        buf.add(obs, action, reward, nxt, term, trunc)
        if sb3 is not None:
            sb3.add(obs, nxt, action[:, None], reward, term | trunc, [{}] * num_envs)
    return buf, sb3


def time_batches(fn, batches: int, repeats: int = 5) -> float:
    """Median batches/s of `fn` (which leaves one batch on the device)."""
    rates = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(batches):
            fn()
        sync()
        rates.append(batches / (time.perf_counter() - start))
    return statistics.median(rates)


def replay_to_gpu() -> dict:
    buf, sb3 = filled(50_000 if not SMALL else 2_000, 5_000 if not SMALL else 200)
    plain = np.empty((len(buf), 5, 84, 84), np.uint8)  # the naive layout: one window per transition
    plain[:] = np.random.default_rng(1).integers(0, 256, (1, 5, 84, 84), dtype=np.uint8)
    rng = np.random.default_rng(2)
    out = {}
    n = 200 if not SMALL else 5
    for batch in (32, 256):
        rates = {}
        for depth in (0, 2):
            with Prefetcher(buf, batch, DEVICE, depth=depth) as pf:
                pf.next()
                rates[f"dqn_fast_prefetch_depth{depth}"] = time_batches(lambda: pf.next().obs.sum(), n)
        if sb3 is not None:
            rates["sb3_sample_to_device"] = time_batches(lambda: sb3.sample(batch).observations.sum(), n)

        def numpy_take():
            rows = rng.integers(0, len(plain), batch)
            torch.from_numpy(plain[rows]).to(DEVICE).sum()

        rates["numpy_take_to_device"] = time_batches(numpy_take, n)
        window_bytes = batch * 5 * 84 * 84
        out[f"batch{batch}"] = {
            "batches_per_s": rates,
            "frames_GB_per_s": {k: v * window_bytes / 1e9 for k, v in rates.items()},
        }
        print(f"replay->{DEVICE} batch {batch}:", {k: round(v) for k, v in rates.items()}, flush=True)
    return out


def learner_updates_per_s(depth: int, updates: int) -> dict:
    from dqn_fast.agent import DQNAgent, LearnerConfig

    buf, _ = filled(50_000 if not SMALL else 2_000, 2000 if not SMALL else 100)
    agent = DQNAgent((4, 84, 84), 6, LearnerConfig(), DEVICE)
    with Prefetcher(buf, 32, DEVICE, depth=depth) as pf:
        for _ in range(20):
            b = pf.next()
            agent.update(b.obs, b.action, b.reward, b.next_obs, b.terminated)
        sync()
        pf.wait_seconds = 0.0
        start = time.perf_counter()
        for _ in range(updates):
            b = pf.next()
            agent.update(b.obs, b.action, b.reward, b.next_obs, b.terminated)
        sync()
        elapsed = time.perf_counter() - start
        return {"updates_per_s": updates / elapsed, "wait_share": pf.wait_seconds / elapsed}


def atari_training() -> dict:
    from dqn_fast.bench.train_speed import cleanrl_style, ours

    steps, starts, repeats = (3000, 1000, 2) if not SMALL else (40, 40, 1)
    runs = {"dqn_fast_depth2": [], "dqn_fast_depth0": [], "cleanrl_style_sb3": []}
    have_sb3 = importlib.util.find_spec("stable_baselines3") is not None
    for _ in range(repeats):  # interleaved
        runs["dqn_fast_depth2"].append(ours(steps, starts, device=DEVICE))
        runs["dqn_fast_depth0"].append(ours(steps, starts, device=DEVICE, prefetch_depth=0))
        if have_sb3:
            runs["cleanrl_style_sb3"].append(cleanrl_style(steps, starts, device=DEVICE))
        print("atari training:", {k: [round(r["steps_per_s"], 1) for r in v] for k, v in runs.items()}, flush=True)
    result = {k: {"steps_per_s": statistics.median(r["steps_per_s"] for r in v), "repeats": v} for k, v in runs.items() if v}
    if have_sb3:
        result["speedup_vs_cleanrl_style"] = result["dqn_fast_depth2"]["steps_per_s"] / result["cleanrl_style_sb3"]["steps_per_s"]
    else:
        result["cleanrl_style_sb3"] = "missing: stable-baselines3 not installed"
    result["timed_steps"] = steps
    return result


def main() -> int:
    global DEVICE, SMALL
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU standing in for the GPU")
    args = parser.parse_args()
    if args.dry_run:
        DEVICE, SMALL = "cpu", True
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --dry-run to test the script)", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (dry run)"
    results = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    print(results, flush=True)
    results["cuda_matches_cpu"] = check_cuda_matches_cpu()
    print("CUDA prefetch == CPU prefetch:", results["cuda_matches_cpu"], flush=True)
    results["replay_to_device"] = replay_to_gpu()
    n = 500 if not SMALL else 5
    results["learner"] = {f"depth{d}": learner_updates_per_s(d, n) for d in (0, 2)}
    print("learner:", results["learner"], flush=True)
    if importlib.util.find_spec("ale_py") and importlib.util.find_spec("gymnasium"):
        results["atari_train"] = atari_training()
    else:
        results["atari_train"] = "missing: gymnasium/ale-py not installed"
    print(json.dumps(results, indent=1, default=str))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
