"""Learning curves on CartPole-v1: uniform one-step replay against n-step +
prioritized replay, each with its own tuned recipe, over several seeds.

    python scripts/cartpole_curves.py OUT_DIR [--seeds 1,2,3] [--recipes uniform,nstep_per]

Every `--eval-every` env steps the greedy online network plays
`--eval-episodes` evaluation episodes (epsilon 0, seeds of their own); the
curve is the mean return against env steps and against wall seconds. Wall
seconds are the run's own time (env steps, replay, updates) without the
evaluations, which a training run does not need. A run is "solved" at its
first evaluation with a mean >= `--threshold` (475: CartPole-v1's reward
threshold). Writes OUT_DIR/cartpole_curves.json and OUT_DIR/cartpole_curves.png;
the runs' logs go to --runs-dir (a temporary folder by default, not OUT_DIR).
Each run lasts its recipe's own total_steps (epsilon and beta schedules are
fractions of it) unless --total-steps says otherwise. One run at a time,
torch threads as the recipe says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from dqn_fast.train import Config, Trainer, play

# Each recipe is overrides on top of Config.for_env("CartPole-v1"). "nstep_per"
# is the library's CartPole recipe (dqn_fast/config.py); "uniform" is the same
# recipe with uniform one-step replay, the best of the uniform variants tried
# (tau 0.005 over 50k steps, and exploration over 10% of 40k, each left a seed
# of 1-3 below 475).
RECIPES = {
    "uniform": dict(n_step=1, prioritized=False),
    "nstep_per": dict(),
}


def run_one(name: str, seed: int, args) -> dict:
    overrides = dict(RECIPES[name])
    overrides.update(seed=seed, progress=False, checkpoint_interval=10**12,
                     log_interval=10**12, run_dir=os.path.join(args.runs_dir, f"{name}__{seed}"))
    if args.total_steps is not None:  # else the recipe's own (its schedules depend on it)
        overrides["total_steps"] = args.total_steps
    cfg = Config.for_env("CartPole-v1", **overrides)
    curve = []
    state = dict(next_eval=args.eval_every, eval_seconds=0.0, solved=None)
    start = time.perf_counter()

    def on_step(trainer) -> bool:
        if trainer.global_step < state["next_eval"]:
            return False
        state["next_eval"] += args.eval_every
        t0 = time.perf_counter()
        wall = t0 - start - state["eval_seconds"]
        returns = play(trainer.agent, cfg.env, args.eval_episodes, seed=1_000_003 + trainer.global_step)
        state["eval_seconds"] += time.perf_counter() - t0
        mean = float(np.mean(returns))
        curve.append(dict(step=trainer.global_step, seconds=round(wall, 3), mean=mean, std=float(np.std(returns)), updates=trainer.agent.updates))
        if mean >= args.threshold and state["solved"] is None:
            state["solved"] = dict(step=trainer.global_step, seconds=round(wall, 3))
        print(f"{name} seed {seed}: step {trainer.global_step:>6} {wall:6.1f}s eval {mean:6.1f}", file=sys.stderr, flush=True)
        if args.max_seconds is not None and wall > args.max_seconds:
            return True
        return args.stop_at_solve and state["solved"] is not None

    trainer = Trainer(cfg)
    summary = trainer.run(on_step=on_step)
    wall = time.perf_counter() - start - state["eval_seconds"]
    return dict(recipe=name, seed=seed, config={k: v for k, v in vars(cfg).items() if k != "run_dir"}, curve=curve,
                solved=state["solved"], steps=summary["steps"], updates=summary["updates"], seconds=round(wall, 3),
                torch_threads=summary["torch_threads"])


def plot(results: list, threshold: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"uniform": "tab:blue", "nstep_per": "tab:orange"}
    labels = {"uniform": "uniform, 1-step", "nstep_per": "n-step 3 + prioritized"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, x, xlabel in ((axes[0], "step", "env steps"), (axes[1], "seconds", "wall seconds (2-core CPU, evaluation excluded)")):
        seen = set()
        for r in results:
            xs = [p[x] for p in r["curve"]]
            ys = [p["mean"] for p in r["curve"]]
            label = labels.get(r["recipe"], r["recipe"]) if r["recipe"] not in seen else None
            seen.add(r["recipe"])
            ax.plot(xs, ys, color=colors.get(r["recipe"]), alpha=0.8, lw=1.4, label=label)
        ax.axhline(threshold, color="gray", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("evaluation mean return")
    axes[0].legend(loc="lower right")
    fig.suptitle("DQN on CartPole-v1, one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="where cartpole_curves.json and cartpole_curves.png go")
    p.add_argument("--runs-dir", default=os.path.join(tempfile.gettempdir(), "cartpole_curves_runs"),
                   help="the runs' logs and checkpoints (default: %(default)s)")
    p.add_argument("--seeds", default="1,2,3", help="comma separated (default: %(default)s)")
    p.add_argument("--recipes", default="uniform,nstep_per", help=f"comma separated, from {sorted(RECIPES)} (default: %(default)s)")
    p.add_argument("--total-steps", type=int, default=None, help="env steps per run (default: each recipe's total_steps)")
    p.add_argument("--eval-every", type=int, default=2_500, help="env steps between evaluations (default: %(default)s)")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes per evaluation (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=475.0, help="evaluation mean that counts as solved (default: %(default)s)")
    p.add_argument("--stop-at-solve", action="store_true", help="end each run at its first solved evaluation")
    p.add_argument("--max-seconds", type=float, default=None, help="end a run at the first evaluation past this many wall seconds")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = [s.strip() for s in args.recipes.split(",") if s.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"--recipes: unknown {unknown}; expected names from {sorted(RECIPES)}")
    if args.eval_every < 1 or args.eval_episodes < 1 or (args.total_steps is not None and args.total_steps < 1):
        p.error("--total-steps, --eval-every and --eval-episodes must be positive")
    os.makedirs(args.out_dir, exist_ok=True)
    results = [run_one(name, seed, args) for name in names for seed in seeds]
    table = {}
    for name in names:
        runs = [r for r in results if r["recipe"] == name]
        table[name] = dict(
            solved_steps=[r["solved"] and r["solved"]["step"] for r in runs],
            solved_seconds=[r["solved"] and r["solved"]["seconds"] for r in runs],
            all_solved=all(r["solved"] is not None for r in runs),
        )
    out = dict(
        env="CartPole-v1",
        threshold=args.threshold,
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        total_steps=args.total_steps,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version()),
        date=time.strftime("%Y-%m-%d"),
        command=" ".join([os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:])),
        summary=table,
        runs=results,
    )
    with open(os.path.join(args.out_dir, "cartpole_curves.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(results, args.threshold, os.path.join(args.out_dir, "cartpole_curves.png"))
    for name, row in table.items():
        print(f"{name}: env steps to {args.threshold:g}: {row['solved_steps']}, seconds: {row['solved_seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
