"""The `uptake` command. Each subcommand is a thin shell over a function in adaptation/ or service/."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int | None]


def _add_world(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="generate the knowledge world (deterministic per seed)")
    p.add_argument("--out", required=True, help="directory for the split JSONL files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--people", type=int, default=None, help="pretrain people (default: world's)")
    p.add_argument("--conflicts", action="store_true", help="also emit a conflicting-sources split")
    p.set_defaults(handler=_run_world)


def _run_world(args: argparse.Namespace) -> int:
    from adaptation.world import WorldConfig, write_world

    cfg = WorldConfig(seed=args.seed)
    if args.people:
        cfg = cfg.replace(pretrain_people=args.people)
    paths = write_world(args.out, cfg)
    for name, path in paths.items():
        print(f"{name:<20} {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uptake",
        description="Keep a language model's knowledge current: documents in, answers out.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_world,):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
