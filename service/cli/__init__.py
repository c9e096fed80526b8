"""The `uptake` command: one parser over the service's commands (`serving.py`) and the lab's
(`lab.py`). Each handler imports what it needs, so `uptake --help` and argument errors come back
without loading torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from adaptation.bases import BaseMissing
from service.cli import lab, serving

Handler = Callable[[argparse.Namespace], int | None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uptake",
        description="Keep a language model's knowledge current: documents in, answers out.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        lab.add_world,
        lab.add_bootstrap,
        lab.add_eval,
        lab.add_meta_train,
        lab.add_weights,
        serving.add_fit_tfidf,
        serving.add_serve,
        serving.add_worker,
        serving.add_up,
        serving.add_keys,
        lab.add_bench,
        lab.add_forget_check,
        lab.add_trust,
        lab.add_squad_split,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return int(handler(args) or 0)
    except BaseMissing as exc:  # a lab command on the default base without its package
        print(f"uptake: {exc}", file=sys.stderr)
        return 2
