"""The `dqn-fast` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dqn-fast", description="Fast experience replay and DQN.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the replay benchmark: table, results.json")
    bench.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    bench.add_argument("--out", default="bench-results", help="directory for results.json (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import run

        run(quick=args.quick, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
