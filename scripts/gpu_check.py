"""All GPU checks and GPU benchmarks in one run (a few minutes on one GPU).

1. The CUDA path of the prefetcher (pinned slots, non-blocking copies on a
   side stream, CUDA events) gives exactly the batches of the CPU path on the
   same seed, with adds in between, for depths 0 and 2, window on and off.
2. Learner throughput on the GPU with prefetch depth 0 vs 2: end-to-end Atari
   training steps/s when ale-py and gymnasium are importable, else updates/s
   of the Nature CNN fed from an Atari-shaped buffer.

Usage: python scripts/gpu_check.py [--out DIR]   (writes DIR/gpu_results.json)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


def check_cuda_matches_cpu() -> dict:
    from dqn_fast import ReplayBuffer
    from dqn_fast.prefetch import Prefetcher

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
            gpu = Prefetcher(bufs[0], 32, "cuda", depth=depth, window=window)
            cpu = Prefetcher(bufs[1], 32, "cpu", depth=depth, window=window)
            assert all(s.ids.is_pinned() for s in gpu.slots), "host slots must be pinned"
            for t in range(100, 300):
                g, c = gpu.next(), cpu.next()
                assert g.obs.is_cuda
                for name in ("obs", "next_obs", "action", "reward", "terminated", "truncated", "ids"):
                    assert torch.equal(getattr(g, name).cpu(), getattr(c, name)), (depth, window, name)
                checked += 1
                gpu.barrier(), cpu.barrier()
                add(t)
            gpu.close(), cpu.close()
    return {"batches_compared": checked, "ok": True}


def atari_steps_per_s(depth: int, steps: int) -> dict:
    from dqn_fast.bench.train_speed import ours  # noqa: F401 - needs gymnasium + ale-py
    import tempfile

    from dqn_fast.train import Config, Trainer

    with tempfile.TemporaryDirectory() as d:
        cfg = Config.for_env("ALE/Pong-v5", total_steps=2000 + steps, learning_starts=2000, log_interval=2000,
                             buffer_size=20_000, run_dir=d, progress=False, device="cuda", prefetch_depth=depth,
                             num_envs=8, checkpoint_interval=10**12)
        summary = Trainer(cfg).run()
        rows = [r.split(",") for r in open(os.path.join(d, "progress.csv")).read().splitlines()[1:]]
    (s0, t0), (s1, t1) = (float(rows[0][0]), float(rows[0][1])), (float(rows[-1][0]), float(rows[-1][1]))
    return {"steps_per_s": (s1 - s0) / (t1 - t0), "replay_share": summary["replay_share"]}


def learner_updates_per_s(depth: int, updates: int) -> dict:
    from dqn_fast import ReplayBuffer
    from dqn_fast.agent import DQNAgent, LearnerConfig
    from dqn_fast.bench.replay import AtariEnvs
    from dqn_fast.prefetch import Prefetcher

    buf = ReplayBuffer(50_000, (4, 84, 84), frame_stack=4, num_envs=8, seed=0)
    envs = AtariEnvs(8, seed=0)
    for _ in range(2000):
        buf.add(*envs.step())
    agent = DQNAgent((4, 84, 84), 6, LearnerConfig(), "cuda")
    with Prefetcher(buf, 32, "cuda", depth=depth) as pf:
        for _ in range(20):
            b = pf.next()
            agent.update(b.obs, b.action, b.reward, b.next_obs, b.terminated)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(updates):
            b = pf.next()
            agent.update(b.obs, b.action, b.reward, b.next_obs, b.terminated)
        torch.cuda.synchronize()
        return {"updates_per_s": updates / (time.perf_counter() - start), "wait_s": pf.wait_seconds}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    results["cuda_matches_cpu"] = check_cuda_matches_cpu()
    print("CUDA prefetch == CPU prefetch:", results["cuda_matches_cpu"], flush=True)
    try:
        import ale_py  # noqa: F401
        import gymnasium  # noqa: F401

        results["atari_train"] = {f"depth_{d}": atari_steps_per_s(d, 4000) for d in (0, 2)}
    except ImportError:
        results["atari_train"] = "skipped: gymnasium/ale-py not installed"
    results["learner"] = {f"depth_{d}": learner_updates_per_s(d, 500) for d in (0, 2)}
    print(json.dumps(results, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
