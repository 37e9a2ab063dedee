"""The `dqn-fast` command line: train, eval, bench."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

HELP = {
    "env": "gymnasium env id (CartPole-v1) or Atari id (ALE/Pong-v5, BreakoutNoFrameskip-v4)",
    "total_steps": "environment steps over all envs",
    "num_envs": "environments stepped in lockstep, acting with one batched forward pass",
    "seed": "seed for envs, buffer sampling, exploration and network init",
    "device": "auto | cpu | cuda | cuda:N",
    "run_dir": "where logs and checkpoint.pt go (default runs/<env>__<seed>)",
    "buffer_size": "replay capacity in transitions",
    "batch_size": "transitions per learner update",
    "learning_starts": "env steps before the first update",
    "train_freq": "env steps per learner update",
    "n_step": "n-step returns: discounted reward sum over up to n steps, cut at episode ends",
    "prioritized": "proportional prioritized replay (new priorities: |TD error|)",
    "alpha": "prioritized replay: priority exponent",
    "beta0": "prioritized replay: importance-weight exponent at the start, annealed linearly to 1",
    "priority_eps": "prioritized replay: added to every priority by the buffer",
    "compress": "store frames compressed: lz4 (fastest sampling) or zstd (smallest); none: raw",
    "frame_memory": "with --compress: bytes the frames may take (0: an eighth of their raw size)",
    "lr": "learning rate",
    "gamma": "discount factor",
    "optimizer": "adam | rmsprop (Nature DQN settings)",
    "loss": "huber | mse",
    "double_dqn": "double DQN targets",
    "max_grad_norm": "gradient-norm clip (0: off)",
    "target_update_interval": "learner updates between target-network syncs",
    "tau": "target sync: 1.0 hard copy, < 1 Polyak averaging",
    "hidden": "MLP hidden sizes for vector observations, comma separated",
    "dueling": "dueling head: Q = V + A - mean(A)",
    "eps_start": "initial exploration epsilon",
    "eps_end": "final exploration epsilon",
    "exploration_fraction": "fraction of total steps over which epsilon decays linearly",
    "clip_rewards": "clip training rewards to their sign (raw scores are logged)",
    "prefetch_depth": "batches sampled ahead on a background thread (0: synchronous)",
    "window": "move frames as a k+1 frame window instead of obs + next_obs",
    "torch_threads": "torch CPU threads (0: measure updates with 1..cores threads now and then and keep the fastest)",
    "log_interval": "env steps between log rows (progress.csv, TensorBoard)",
    "checkpoint_interval": "env steps between checkpoints (one is always written at the end)",
    "save_buffer": "include the replay buffer in checkpoints, so --resume continues without refilling it",
    "eval_episodes": "episodes for `dqn-fast eval` when --episodes is not given",
    "eval_epsilon": "epsilon during evaluation",
    "resume": "continue from run_dir/checkpoint.pt if it exists",
    "progress": "show a live progress bar",
}


def _train_parser(sub) -> argparse.ArgumentParser:
    from .config import Config

    p = sub.add_parser("train", help="train a DQN", description="Train a DQN. Defaults come from the env's recipe.")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default) if f.default is not None else str
        if f.name == "hidden":
            p.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",") if x), help=HELP[f.name])
        elif kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name])
        else:
            p.add_argument(flag, type=kind, default=None, help=HELP[f.name])
    return p


def train_config(args):
    """The Config that `dqn-fast train` with these parsed arguments runs: the
    env's recipe, with every flag given on top."""
    from .config import Config

    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    return Config.for_env(overrides.pop("env") or "CartPole-v1", **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqn-fast", description="Fast experience replay and DQN.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("checkpoint", help="path to checkpoint.pt")
    ev.add_argument("--episodes", type=int, default=None, help="episodes to play (default: the run's eval_episodes)")
    ev.add_argument("--seed", type=int, default=1_000_003, help="env and exploration seed")
    ev.add_argument("--epsilon", type=float, default=None, help="exploration during evaluation (default: the run's)")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ev.add_argument("--json", action="store_true", help="end with one line of JSON")
    bench = sub.add_parser("bench", help="replay buffers side by side: table, results.json, plots")
    bench.add_argument("--quick", action="store_true", help="small sizes, about 3 minutes (full: about 17)")
    bench.add_argument("--out", default="bench-results", help="directory for results.json and the plots (default: %(default)s)")
    bench.add_argument("--peers", default=None, help="comma-separated peer names to run (default: all; see dqn_fast/bench/peers.py)")
    bench.add_argument("--train", action="store_true", help="also time Atari training against a CleanRL-style loop (needs the atari and sb3 extras)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("dqn-fast: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as exc:
        print(f"dqn-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "train":
        from .train import train

        summary = train(train_config(args))
        print(
            f"done: {summary['steps']:,} steps, {summary['games']} episodes, "
            f"mean return (last 20) {summary['mean_return_last_20']}, {summary['steps_per_s']:.0f} steps/s, "
            f"checkpoint {summary['checkpoint']}"
        )
    elif args.command == "eval":
        import torch

        from .train import evaluate

        episodes = args.episodes
        if episodes is None:
            episodes = int(torch.load(args.checkpoint, map_location="cpu", weights_only=False)["config"]["eval_episodes"])
        result = evaluate(args.checkpoint, episodes, seed=args.seed, epsilon=args.epsilon, device=args.device)
        for i, r in enumerate(result["returns"]):
            print(f"episode {i + 1}: return {r:g}")
        print(f"{result['env']}: mean return {result['mean_return']:.2f} +- {result['std_return']:.2f} over {episodes} episodes")
        if args.json:
            print(json.dumps(result))
    elif args.command == "bench":
        from .bench import run
        from .bench.compression import NAMES as COMPRESSION_ROWS
        from .bench.peers import COMPARED
        from .bench.peers_compression import BY_NAME as COMPRESSION_PEERS
        from .bench.peers_features import BY_NAME as FEATURE_PEERS

        only = None if args.peers is None else [p.strip() for p in args.peers.split(",") if p.strip()]
        names = [c.name for c in COMPARED]
        for extra in (FEATURE_PEERS, COMPRESSION_PEERS, COMPRESSION_ROWS):
            names += [n for n in extra if n not in names]
        unknown = [p for p in only or [] if p not in names]
        if unknown:
            raise ValueError(f"--peers: unknown {unknown}; expected names from {names}")
        run(quick=args.quick, out_dir=args.out, train=args.train, only=only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
