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


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _add_bootstrap(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="build the demo model (tokenizer + small Llama pretrained on the knowledge world)",
        description="Builds the world, the tokenizer and the demo model under UPTAKE_HOME "
        "(default ~/.cache/uptake). The full build takes about 15 minutes on 2 CPU cores.",
    )
    p.add_argument(
        "--quick", action="store_true", help="a tiny model in under a minute (for tests)"
    )
    p.add_argument("--out", default=None, help="model directory (default: UPTAKE_HOME/demo)")
    p.add_argument(
        "--variant",
        default="demo",
        choices=["demo", "variant"],
        help="'variant' is a second base with another size and tokenizer",
    )
    p.add_argument("--world", default=None, help="world directory (default: UPTAKE_HOME/world)")
    p.set_defaults(handler=_run_bootstrap)


def _run_bootstrap(args: argparse.Namespace) -> int:
    from pathlib import Path

    from adaptation.bootstrap import build_demo_model

    out = build_demo_model(
        out_dir=Path(args.out) if args.out else None,
        variant=args.variant,
        world_dir=Path(args.world) if args.world else None,
        quick=args.quick,
    )
    print((out / "README.md").read_text())
    print(out)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="stream a dataset through each strategy and score uptake and retention",
        description="Every strategy starts from the same base and reads the stream once; it is "
        "scored closed-book on the stream's questions and on retention questions. Writes "
        "report.json, report.md and uptake.png to --out.",
    )
    p.add_argument("--data", required=True, help="JSONL stream or SQuAD-style JSON")
    p.add_argument("--model", default=None, help="base model dir or hub id (default: demo model)")
    p.add_argument(
        "--strategies",
        default="uniform,salient,tfidf,rag",
        help="comma list of uniform,salient,tfidf,camels,rag,mac,mac+rag",
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--retention",
        default=None,
        help="retention QA file (default: retention_qa.jsonl beside --data, if any)",
    )
    p.add_argument("--limit", type=int, default=None, help="use the first N documents")
    p.add_argument("--seed", type=int, default=None, help="one seed (shortcut for --seeds)")
    p.add_argument("--seeds", type=_ints, default=(0,), help="comma list of seeds, e.g. 0,1,2")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps-per-doc", type=int, default=1)
    p.add_argument("--normalisation", default="tokens", choices=["tokens", "weights", "fixed"])
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument(
        "--sweep-lrs",
        type=_floats,
        default=(),
        help="comma list of learning rates to sweep on --val; the best per strategy "
        "(by uptake, subject to --retention-floor) is used",
    )
    p.add_argument("--val", default=None, help="validation stream for the sweep")
    p.add_argument("--retention-floor", type=float, default=0.9)
    p.add_argument("--weighter", default=None, help="CaMeLS weighting model dir (for camels)")
    p.add_argument("--mac", default=None, help="trained MAC dir (for mac, mac+rag)")
    p.add_argument("--checkpoints", type=int, default=5, help="points on the uptake curve")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from adaptation.bootstrap import ensure_demo_model
    from adaptation.evaluation import EvalConfig, report_markdown, run_eval

    cfg = EvalConfig(
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        lr=args.lr,
        steps_per_doc=args.steps_per_doc,
        normalisation=args.normalisation,
        lora_rank=args.lora_rank,
        seeds=(args.seed,) if args.seed is not None else args.seeds,
        limit=args.limit,
        checkpoints=args.checkpoints,
        weighter_path=args.weighter,
        mac_path=args.mac,
        sweep_lrs=args.sweep_lrs,
        retention_floor=args.retention_floor,
        device=args.device,
    )
    model = args.model or str(ensure_demo_model())
    report = run_eval(args.data, model, args.out, cfg, retention=args.retention, val_data=args.val)
    print(report_markdown(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uptake",
        description="Keep a language model's knowledge current: documents in, answers out.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_world, _add_bootstrap, _add_eval):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
