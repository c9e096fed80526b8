"""The `uptake` command. Each subcommand is a thin shell over a function in adaptation/ or service/."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from adaptation.bases import DEFAULT_BASE, BaseMissing

if TYPE_CHECKING:
    from adaptation.camels_training import MetaTrainConfig
    from service.settings import Settings

Handler = Callable[[argparse.Namespace], int | None]


def _add_world(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="generate the knowledge world (deterministic per seed)")
    p.add_argument("--out", required=True, help="directory for the split JSONL files")
    p.add_argument(
        "--seed", type=int, default=0, help="same seed, same world (default: %(default)s)"
    )
    p.add_argument("--people", type=int, default=None, help="pretrain people (default: world's)")
    p.add_argument(
        "--conflicts",
        type=int,
        default=0,
        metavar="N",
        help="also write conflicts.jsonl: N new people, half of them with one fact stated "
        "differently by a 'reliable' and an 'unreliable' source (questions expect the reliable "
        "value), the rest with one uncontested fact from either source",
    )
    p.set_defaults(handler=_run_world)


def _run_world(args: argparse.Namespace) -> int:
    from adaptation.conflicts import ConflictConfig, write_conflicts
    from adaptation.world import WorldConfig, write_world

    cfg = WorldConfig(seed=args.seed)
    if args.people:
        cfg = cfg.replace(pretrain_people=args.people)
    paths = write_world(args.out, cfg)
    if args.conflicts:
        paths["conflicts"] = write_conflicts(args.out, cfg, ConflictConfig(people=args.conflicts))
    for name, path in paths.items():
        print(f"{name:<20} {path}")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _add_bootstrap(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="build the demo model (tokenizer + small Llama pretrained on the knowledge world) "
        "and its CaMeLS weighting model and MAC networks",
        description="Builds the world, the tokenizer and the demo model under UPTAKE_HOME "
        "(default ~/.cache/uptake), then meta-trains for it the demo CaMeLS weighting model "
        "(UPTAKE_HOME/camels, for UPTAKE_STRATEGY=camels) and the demo MAC networks "
        "(UPTAKE_HOME/mac, for UPTAKE_MODE=mac) on the world's meta-train stream. On 2 otherwise "
        "idle CPU cores the whole build takes 35 to 55 minutes: the model 12 to 19, the "
        "weighting model 21 to 30 (563 meta-training steps) and the MAC networks 5 to 7 (720 "
        "steps); a few minutes in all on a GPU. "
        "A part already built is kept (--rebuild builds everything again), unless it is older "
        "than the model it was trained for. --model-only, --variant and --out build "
        "the model alone; `uptake up` builds whatever its strategy and mode need when missing.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny versions of all three in about a minute (for tests; they learn little)",
    )
    p.add_argument("--out", default=None, help="model directory (default: UPTAKE_HOME/demo)")
    p.add_argument(
        "--variant",
        default="demo",
        choices=["demo", "variant", "reader"],
        help="'variant' is a second base with another size and tokenizer; 'reader' is the "
        "demo's shape also taught to answer from its context (for rag and mac): 16 minutes "
        "to build, closed-book extraction 0.48 to 0.61 against the demo's "
        "0.46 to 0.53, but retrieved text in its prompt costs its retention more",
    )
    p.add_argument("--world", default=None, help="world directory (default: UPTAKE_HOME/world)")
    p.add_argument(
        "--model-only", action="store_true", help="skip the weighting model and MAC networks"
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="build every part again, even those already built",
    )
    p.set_defaults(handler=_run_bootstrap)


def _run_bootstrap(args: argparse.Namespace) -> int:
    from pathlib import Path

    from adaptation import bootstrap
    from adaptation.paths import demo_mac_dir, demo_weighter_dir

    out = Path(args.out) if args.out else bootstrap.model_home(args.variant, args.quick)
    if args.rebuild or not bootstrap.is_built(out):
        world = Path(args.world) if args.world else None
        bootstrap.build_demo_model(out, args.variant, world, quick=args.quick)
    else:
        print(f"{out} is already built; --rebuild builds it again")
    print((out / "README.md").read_text())
    print(out)
    if args.model_only or args.out or args.variant != "demo":
        return 0
    parts = (
        (
            "demo CaMeLS weighting model",
            demo_weighter_dir(args.quick),
            bootstrap.build_demo_weighter,
        ),
        ("demo MAC networks", demo_mac_dir(args.quick), bootstrap.build_demo_mac),
    )
    for name, part_dir, build in parts:
        if args.rebuild or not bootstrap.is_current(part_dir, out):
            build(out, quick=args.quick)
            print(f"{name}: {part_dir}")
        else:
            print(f"{name}: {part_dir} (already built)")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="learn a dataset with each strategy and score uptake, retention and reading",
        description="Every strategy starts from the same base and learns the documents (the "
        "gradient strategies through the worker's own learner), under --protocol stream (one "
        "adapter reads them in order) or single (each document alone from a fresh adapter). "
        "It is scored closed-book on the documents' questions (F1, and recall of the gold "
        "answer in the answer's first sentence), on retention questions, and in context on "
        "--reading passages. Writes report.json, report.md and uptake.png to --out.",
    )
    p.add_argument("--data", required=True, help="JSONL stream or SQuAD-style JSON")
    p.add_argument(
        "--protocol",
        choices=["stream", "single"],
        default="stream",
        help="stream: one adapter (or store) reads the documents once, in order, and is asked "
        "all their questions at the end; single (SEAL's): each document is learned alone from "
        "a fresh adapter, asked its own questions, then the adapter is reset, and uptake is "
        "the mean over documents (default: %(default)s)",
    )
    p.add_argument(
        "--epochs",
        type=_at_least_one,
        default=1,
        help="passes over each document's training sequences (its text's chunks, plus its "
        "self-edits for seal), in either protocol (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"base model: a packaged short name, a local HF directory or a hub id (default: {DEFAULT_BASE})",
    )
    p.add_argument(
        "--strategies",
        default="uniform,salient,tfidf,rag",
        help="comma list of uniform,salient,tfidf,camels,seal,seal-best,rag,mac,mac+rag "
        "(seal trains on the document plus its self-edits: supplied ones, or the template "
        "paraphraser's for a world article; seal-best keeps the best of --best-of-k)",
    )
    p.add_argument(
        "--out", required=True, help="directory for report.json, report.md and the plots"
    )
    p.add_argument(
        "--retention",
        default=None,
        help="retention QA file: questions the base already answers, asked closed-book "
        "before and after (default: retention_qa.jsonl beside --data, if any)",
    )
    p.add_argument(
        "--reading",
        default=None,
        help="held-out passages with questions (JSONL or SQuAD-style JSON): each question is "
        "asked with its own passage in context, before and after, to tell whether the model "
        "still reads (default: none)",
    )
    p.add_argument("--limit", type=int, default=None, help="use the first N documents")
    p.add_argument("--seed", type=int, default=None, help="one seed (shortcut for --seeds)")
    p.add_argument("--seeds", type=_ints, default=(0,), help="comma list of seeds, e.g. 0,1,2")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="LoRA learning rate, unless swept (default: %(default)s)",
    )
    p.add_argument(
        "--steps-per-doc",
        type=int,
        default=1,
        help="gradient steps on each document, unless swept (default: %(default)s)",
    )
    p.add_argument(
        "--normalisation",
        default="tokens",
        choices=["tokens", "weights", "fixed"],
        help="divide the weighted loss by the token count, the sum of weights, or a fixed "
        "1,024 (default: %(default)s)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=16,
        help="LoRA rank, as the service's UPTAKE_LORA_RANK (default: %(default)s)",
    )
    p.add_argument(
        "--lora-alpha",
        type=int,
        default=32,
        help="LoRA alpha (the update is scaled by alpha / rank), as the service's "
        "UPTAKE_LORA_ALPHA (default: %(default)s)",
    )
    p.add_argument(
        "--lora-targets",
        type=_names,
        default=None,
        help="comma list of module names to adapt, e.g. gate_proj,up_proj,down_proj "
        "(default: every attention and MLP projection present)",
    )
    p.add_argument(
        "--full-finetune",
        action="store_true",
        help="train every weight of the base instead of a LoRA adapter (the baseline for "
        "LoRA's uptake and retention; on the demo, rates of 5e-5 to 1e-4 suited it)",
    )
    p.add_argument(
        "--sweep-lrs",
        type=_floats,
        default=(),
        help="comma list of learning rates to sweep on --val; the best per strategy "
        "(by uptake, subject to --retention-floor) is used",
    )
    p.add_argument(
        "--sweep-steps",
        type=_ints,
        default=(),
        help="comma list of steps per document to sweep with each rate (default: --steps-per-doc)",
    )
    p.add_argument("--val", default=None, help="validation stream for the sweep")
    p.add_argument(
        "--retention-floor",
        type=float,
        default=0.9,
        help="the sweep keeps only settings whose retention is at least this (default: %(default)s)",
    )
    p.add_argument("--weighter", default=None, help="CaMeLS weighting model dir (for camels)")
    p.add_argument("--mac", default=None, help="trained MAC dir (for mac, mac+rag)")
    p.add_argument("--checkpoints", type=int, default=5, help="points on the uptake curve")
    p.add_argument(
        "--retention-matrix",
        action="store_true",
        help="after every document, score every earlier document's questions; draws the heat maps",
    )
    p.add_argument(
        "--best-of-k",
        type=int,
        default=3,
        help="seal-best: candidate self-edits per document, each trained from the same state and "
        "scored on probe questions (default 3)",
    )
    p.add_argument(
        "--trust",
        type=_trust_weights,
        default={},
        metavar="SOURCE=W,...",
        help="trust weights in [0, 1] per document source, scaling each document's update "
        "(unlisted sources: 1.0)",
    )
    p.add_argument(
        "--source-tags",
        action="store_true",
        help="prefix training text with a tag per source, the service's tags "
        "(UPTAKE_SOURCE_TAGS; IML, experimental)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(handler=_run_eval)


def _trust_weights(text: str) -> dict[str, float]:
    from adaptation.trust import SourceTrust

    weights: dict[str, float] = {}
    for item in _names(text):
        source, sep, weight = item.rpartition("=")
        if not sep or not source:
            raise argparse.ArgumentTypeError(f"expected SOURCE=WEIGHT, got {item!r}")
        try:
            weights[source] = float(weight)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be a number") from err
    try:
        SourceTrust(weights)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return weights


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_eval(args: argparse.Namespace) -> int:
    from adaptation.evaluation import EvalConfig, report_markdown, run_eval
    from adaptation.learner import LearnSettings
    from adaptation.modeling import DEFAULT_TARGET_MODULES, LoraSettings

    cfg = EvalConfig(
        strategies=_names(args.strategies),
        protocol=args.protocol,
        lr=args.lr,
        steps_per_doc=args.steps_per_doc,
        normalisation=args.normalisation,
        lora=LoraSettings(
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            target_modules=args.lora_targets or DEFAULT_TARGET_MODULES,
        ),
        learning=LearnSettings(tag_salt="" if args.source_tags else None, epochs=args.epochs),
        full_finetune=args.full_finetune,
        seeds=(args.seed,) if args.seed is not None else args.seeds,
        limit=args.limit,
        checkpoints=args.checkpoints,
        weighter_path=args.weighter,
        mac_path=args.mac,
        sweep_lrs=args.sweep_lrs,
        sweep_steps=args.sweep_steps,
        retention_floor=args.retention_floor,
        device=args.device,
        retention_matrix=args.retention_matrix,
        best_of_k=args.best_of_k,
        trust=args.trust,
    )
    model = args.model or DEFAULT_BASE
    report = run_eval(
        args.data,
        model,
        args.out,
        cfg,
        retention=args.retention,
        val_data=args.val,
        reading=args.reading,
    )
    print(report_markdown(report))
    return 0


def _add_meta_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "meta-train",
        help="meta-train a method's learned part (camels: the token-weighting model)",
    )
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    for add in (_add_meta_train_camels, _add_meta_train_mac):
        add(methods)


def _meta_train_data_flags(p: argparse.ArgumentParser, out_help: str, quick_help: str) -> None:
    """What every meta-training method reads and writes."""
    p.add_argument("--base", required=True, help="base model directory or hub id")
    p.add_argument("--train", required=True, help="documents with questions (JSONL or SQuAD JSON)")
    p.add_argument("--val", required=True, help="validation documents with questions")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--quick", action="store_true", help=quick_help)


def _add_meta_train_camels(methods: argparse._SubParsersAction) -> None:
    p = methods.add_parser(
        "camels",
        help="meta-train a CaMeLS weighting model for a base",
        description="Bi-level training: each episode applies --episode-docs documents to the "
        "base's LoRA, one differentiable step each (--inner-optimizer) on the weighted loss, "
        "then scores answer NLL on their questions plus --c-kl x KL on an unrelated passage. "
        "uptake bootstrap uses --inner-optimizer adam --inner-lr 2e-3 --normalisation weights "
        "--steps 563 --minutes 0. The best checkpoint "
        "by validation outer loss is written to --out. Unset options take the defaults of "
        "adaptation.camels_training.MetaTrainConfig; the run prints and records the settings.",
    )
    _meta_train_data_flags(
        p, "directory for the weighting model", "a tiny smoke run (seconds, for tests)"
    )
    p.add_argument(
        "--inner-optimizer",
        default=None,
        choices=["sgd", "adam"],
        help="inner step: plain SGD (default), or the worker's clipped Adam with its moments "
        "carried across documents",
    )
    p.add_argument("--inner-lr", type=float, default=None, help="inner learning rate")
    p.add_argument("--outer-lr", type=float, default=None, help="outer Adam lr")
    p.add_argument("--episode-docs", type=int, default=None, help="documents per episode")
    p.add_argument("--reset-every", type=int, default=None, help="documents between LoRA resets")
    p.add_argument("--c-kl", type=float, default=None, help="locality weight")
    p.add_argument("--grad-accum", type=int, default=None, help="episodes per outer step")
    p.add_argument("--steps", type=int, default=None, help="outer steps")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="finish within this many minutes (0: no limit, only --steps)",
    )
    p.add_argument("--val-every", type=int, default=None, help="outer steps between validations")
    p.add_argument("--val-episodes", type=int, default=None, help="fixed validation episodes")
    p.add_argument(
        "--normalisation",
        default=None,
        choices=["tokens", "weights", "fixed"],
        help="inner loss normalisation",
    )
    p.add_argument("--lora-rank", type=int, default=None, help="rank of the base's LoRA adapter")
    p.add_argument("--hidden", type=int, default=None, help="weighting model width")
    p.add_argument("--layers", type=int, default=None, help="weighting model layers")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="the weighting model's own tokenizer directory (default: the base's)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=None, help="seed for episodes and initialisation")
    p.set_defaults(handler=_run_meta_train_camels)


def _meta_train_camels_config(args: argparse.Namespace) -> MetaTrainConfig:
    import dataclasses

    from adaptation.camels_training import MetaTrainConfig

    options = {
        "inner_optimizer": args.inner_optimizer,
        "inner_lr": args.inner_lr,
        "outer_lr": args.outer_lr,
        "episode_docs": args.episode_docs,
        "reset_every": args.reset_every,
        "c_kl": args.c_kl,
        "grad_accum": args.grad_accum,
        "steps": args.steps,
        "minutes": args.minutes,
        "val_every": args.val_every,
        "val_episodes": args.val_episodes,
        "normalisation": args.normalisation,
        "lora_rank": args.lora_rank,
        "seed": args.seed,
    }
    overrides = {k: v for k, v in options.items() if v is not None}
    config = MetaTrainConfig.quick(**overrides) if args.quick else MetaTrainConfig(**overrides)
    spec = {
        k: v for k, v in {"hidden": args.hidden, "layers": args.layers}.items() if v is not None
    }
    if spec:
        config = dataclasses.replace(config, spec=dataclasses.replace(config.spec, **spec))
    return config


def _run_meta_train_camels(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from adaptation.camels_training import meta_train

    try:
        config = _meta_train_camels_config(args)
        print(json.dumps(dataclasses.asdict(config)))
        tokenizer = None
        if args.tokenizer:
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
        result = meta_train(
            args.base,
            args.train,
            args.val,
            args.out,
            config,
            tokenizer=tokenizer,
            device=args.device,
        )
    except (OSError, ValueError) as exc:
        print(f"uptake meta-train camels: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.card.get("validation", {}), indent=2))
    print(f"seconds per episode: {result.card.get('seconds_per_episode')}")
    print(result.out_dir)
    return 0


def _add_meta_train_mac(methods: argparse._SubParsersAction) -> None:
    p = methods.add_parser(
        "mac",
        help="train MAC networks (amortizer, aggregator, prefix projector) for a frozen base",
        description="Each step amortizes a batch of --batch-docs documents into the memory "
        "(only --backprop-dropout of them with gradient) and scores the base's answer NLL on "
        "all their questions, each reading a prefix aggregated over the whole batch. The best "
        "checkpoint by validation loss is written to --out as a MAC directory, with "
        "training.json. Unset options take the defaults of "
        "adaptation.mac.training.MacTrainConfig (or its QUICK settings with --quick).",
    )
    _meta_train_data_flags(p, "directory for the MAC system", "a tiny smoke run (under 2 minutes)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training documents")
    p.add_argument("--batch-docs", type=int, default=None, help="documents per step (the memory)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument(
        "--backprop-dropout",
        type=float,
        default=None,
        help="fraction of the batch's documents amortized with gradient",
    )
    p.add_argument("--tokens", type=int, default=None, help="T: modulation length per document")
    p.add_argument("--width", type=int, default=None, help="encoder width")
    p.add_argument("--layers", type=int, default=None, help="encoder layers")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop training after this long (a short F1 evaluation follows)",
    )
    p.add_argument(
        "--max-train-docs", type=int, default=None, help="train on the first N documents only"
    )
    p.add_argument(
        "--eval-questions",
        type=int,
        default=None,
        help="validation questions answered at the end for F1 (0: skip)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for batches and initialisation")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.set_defaults(handler=_run_meta_train_mac)


def _run_meta_train_mac(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from adaptation.data import read_documents
    from adaptation.mac.training import QUICK, MacTrainConfig, train_mac

    options = {
        "epochs": args.epochs,
        "batch_docs": args.batch_docs,
        "lr": args.lr,
        "backprop_dropout": args.backprop_dropout,
        "num_tokens": args.tokens,
        "width": args.width,
        "layers": args.layers,
        "max_train_docs": args.max_train_docs,
        "eval_questions": args.eval_questions,
        "seed": args.seed,
        "time_limit_s": None if args.minutes is None else args.minutes * 60.0,
    }
    overrides = {k: v for k, v in options.items() if v is not None}
    try:
        config = dataclasses.replace(QUICK if args.quick else MacTrainConfig(), **overrides)
        print(json.dumps(dataclasses.asdict(config)))
        train, val = read_documents(args.train), read_documents(args.val)
        report = train_mac(args.base, train, val, args.out, config, device=args.device)
    except (OSError, ValueError) as exc:
        print(f"uptake meta-train mac: {exc}", file=sys.stderr)
        return 2
    summary = dataclasses.asdict(report)
    for verbose in ("config", "val_history"):
        summary.pop(verbose)
    print(json.dumps(summary, indent=2))
    return 0


def _add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="show a weighting model's per-token weights on some text",
        description="Prints the text with each token's background coloured by its weight "
        "(relative to the largest in the text), and optionally draws a PNG heat-strip. With "
        "--breakdown, instead tells how much weight falls on the facts, the entity, the "
        "distractors and the filler of a knowledge-world stream.",
    )
    p.add_argument(
        "text", nargs="?", help="the text to weigh; '-' reads standard input, '@FILE' a file"
    )
    p.add_argument(
        "--weighter",
        required=True,
        help="weighting model directory (meta-train out); with --breakdown, a comma list of "
        "directories and names (uniform, salient, tfidf)",
    )
    p.add_argument("--png", default=None, help="also write a heat-strip image here")
    p.add_argument("--table", action="store_true", help="one token per line instead of colour")
    p.add_argument(
        "--breakdown",
        default=None,
        metavar="STREAM",
        help="a world JSONL stream (e.g. eval_stream.jsonl): print each weighting's mean weight "
        "per character class, relative to the article's mean (1 = average), and its share",
    )
    p.set_defaults(handler=_run_weights)


def _run_weights(args: argparse.Namespace) -> int:
    if args.breakdown:
        return _run_weight_breakdown(args)
    from pathlib import Path

    from adaptation.weighting.camels import CamelsWeighter
    from adaptation.weighting.display import ansi_rendering, heat_strip_png, summary, weight_table

    if args.text is None:
        print("uptake weights: give the text to weigh, or --breakdown STREAM", file=sys.stderr)
        return 2
    try:
        if args.text == "-":
            text = sys.stdin.read()
        elif args.text.startswith("@"):
            text = Path(args.text[1:]).read_text(encoding="utf-8")
        else:
            text = args.text
        weighter = CamelsWeighter.load(args.weighter)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as exc:
        print(f"uptake weights: {exc}", file=sys.stderr)
        return 2
    spans = weighter.spans(text)
    print(weight_table(text, spans) if args.table else ansi_rendering(text, spans))
    print(summary(spans))
    if args.png:
        print(heat_strip_png(text, spans, args.png, title=str(args.weighter)))
    return 0


def _run_weight_breakdown(args: argparse.Namespace) -> int:
    from adaptation.data import read_documents
    from adaptation.weighting import make_weighter
    from adaptation.weighting.breakdown import breakdown_table, weight_breakdown

    try:
        docs = read_documents(args.breakdown)
        corpus = [d.text for d in docs]
        weighters = {
            name: make_weighter(name, corpus=corpus)
            if name in ("uniform", "salient", "tfidf")
            else make_weighter("camels", path=os.path.expanduser(name))
            for name in _names(args.weighter)
        }
    except (FileNotFoundError, ValueError) as exc:
        print(f"uptake weights: {exc}", file=sys.stderr)
        return 2
    results = {name: weight_breakdown(w, docs) for name, w in weighters.items()}
    print(f"{len(docs)} articles of {args.breakdown}: relative weight (share of all weight)")
    print(breakdown_table(results))
    return 0


def _service_settings(args: argparse.Namespace) -> Settings:
    """Settings from UPTAKE_* variables, with the flags given on the command line on top; a bad
    value ends the command with one line naming the flag or variable, not a traceback."""
    from pydantic import ValidationError

    from service.settings import Settings

    flags = {k: getattr(args, k, None) for k in ("model", "host", "port", "strategy")}
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:

        def source(field: str) -> str:
            return f"--{field}" if field in given else f"UPTAKE_{field.upper()}"

        problems = "; ".join(
            f"{source('_'.join(map(str, e['loc'])))}: {e['msg']}" for e in exc.errors()
        )
        print(f"uptake {args.command}: {problems}", file=sys.stderr)
        raise SystemExit(2) from None


def _checked_settings(args: argparse.Namespace) -> Settings | None:
    """The service settings, or None (with the reason printed) when the mode cannot run: before
    any model loads or child process starts."""
    from service.settings import ConfigError

    settings = _service_settings(args)
    try:
        settings.check()
    except ConfigError as exc:
        print(f"uptake {args.command}: {exc}", file=sys.stderr)
        return None
    return settings


def _service_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _service_flags(p: argparse.ArgumentParser, http: bool) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="base model: a packaged base's short name (default smollm2-135m-instruct; or "
        "gemma3-270m), a local Hugging Face directory or a hub id (UPTAKE_MODEL)",
    )
    if http:
        p.add_argument("--host", default=None, help="address to bind (UPTAKE_HOST)")
        p.add_argument("--port", type=int, default=None, help="port to bind (UPTAKE_PORT)")


def _add_fit_tfidf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit-tfidf",
        help="fit the tfidf weighting's word statistics, for UPTAKE_STRATEGY=tfidf",
        description="Counts in how many of the given documents each word appears and saves the "
        "idf table as JSON: set UPTAKE_WEIGHTER to it. Fit it on text like what the service "
        "will be sent; words it never saw count as the rarest, so new names weigh most.",
    )
    p.add_argument(
        "data", nargs="+", help="documents: JSONL, a JSON list or SQuAD-style JSON (several files)"
    )
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument(
        "--quantile",
        type=float,
        default=None,
        help="zero each document's words below this quantile of its tf-idf (default: keep all)",
    )
    p.set_defaults(handler=_run_fit_tfidf)


def _run_fit_tfidf(args: argparse.Namespace) -> int:
    from adaptation.data import read_documents
    from adaptation.weighting.tfidf import TfidfWeighter

    try:
        texts = [doc.text for path in args.data for doc in read_documents(path)]
        weighter = TfidfWeighter(args.quantile).fit(texts)
    except (OSError, ValueError) as exc:
        print(f"uptake fit-tfidf: {exc}", file=sys.stderr)
        return 2
    path = weighter.save(args.out)
    print(f"tf-idf of {len(weighter.idf)} words over {weighter.n_docs} documents: {path}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP API and the serving engine")
    _service_flags(p, http=True)
    p.set_defaults(handler=_run_serve)


def _run_process(args: argparse.Namespace, main: Callable[[Settings], object]) -> int:
    """The shared life of a service process: settings, logging, threads, and the embedded Redis
    closed on the way out."""
    from service.redis_conn import close_embedded

    _service_logging()
    settings = _checked_settings(args)
    if settings is None:
        return 2
    settings.apply_torch_threads()
    try:
        main(settings)
    finally:
        close_embedded()
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api import create_app

    return _run_process(args, lambda s: uvicorn.run(create_app(s), host=s.host, port=s.port))


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run the worker that folds queued documents into adapters")
    _service_flags(p, http=False)
    p.set_defaults(handler=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    from service.worker import Worker

    return _run_process(args, lambda s: Worker(s).run_forever())


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="run everything on this machine: embedded Redis, worker and API",
        description="Starts an embedded Redis (unless UPTAKE_REDIS_URL is set), the worker and "
        "the API, on the base UPTAKE_MODEL names (default: the packaged SmolLM2-135M-Instruct, "
        "converted once on first start). Builds nothing else. Ctrl-C stops everything.",
    )
    _service_flags(p, http=True)
    p.set_defaults(handler=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from service.supervisor import run_up

    _service_logging()
    settings = _checked_settings(args)
    return 2 if settings is None else run_up(settings)


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="API keys live, hashed, in the service's Redis: UPTAKE_REDIS_URL, else the "
        "embedded server under UPTAKE_STORE_DIR (the one `uptake up` uses). See docs/security.md.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", help="create a key; its token is printed once, as the last line"
    )
    create.add_argument(
        "--namespace", required=True, help="the namespace the key is for, or '*' for every one"
    )
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        help="read (answers), write (ingest) or admin; repeat for several",
    )
    create.add_argument(
        "--rate-limit",
        type=int,
        default=None,
        help="requests per minute for this key (default UPTAKE_RATE_LIMIT_PER_MINUTE; 0: none)",
    )
    actions.add_parser("list", help="list the keys (never their tokens)")
    revoke = actions.add_parser("revoke", help="revoke a key: its token stops working at once")
    revoke.add_argument("id", help="the key's id, as `uptake keys list` shows it")
    p.set_defaults(handler=_run_keys)


def _run_keys(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    import redis

    from service.auth import KeyStore
    from service.keys import Keys
    from service.redis_conn import close_embedded, connect

    settings = _service_settings(args)
    client = connect(settings)
    store = KeyStore(client, Keys(settings.redis_prefix))
    try:
        if args.action == "create":
            key, token = store.create(args.namespace, tuple(args.scope), args.rate_limit)
            limit = settings.rate_limit_per_minute if key.rate_limit is None else key.rate_limit
            rate = f"{limit} requests per minute" if limit else "no rate limit"
            print(
                f"created API key {key.id} for namespace {key.namespace!r}, scopes "
                f"{', '.join(key.scopes)}, {rate}. Keep the token below secret; it is not "
                "shown again:"
            )
            print(token)
        elif args.action == "list":
            for key in store.list_keys():
                created = datetime.fromtimestamp(key.created, timezone.utc).isoformat(
                    timespec="seconds"
                )
                limit = "default" if key.rate_limit is None else str(key.rate_limit)
                print(
                    f"{key.id}  namespace={key.namespace}  scopes={','.join(key.scopes)}  "
                    f"rate_limit={limit}  created={created}"
                )
        elif not store.revoke(args.id):
            print(
                f"uptake keys revoke: no API key with id {args.id!r}; see `uptake keys list`",
                file=sys.stderr,
            )
            return 2
        else:
            print(f"revoked API key {args.id}")
    except ValueError as exc:
        print(f"uptake keys {args.action}: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"uptake keys: Redis is unreachable ({exc}); check UPTAKE_REDIS_URL", file=sys.stderr)
        return 1
    finally:
        client.close()
        close_embedded()
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure the service against bare loops (writes bench.json, bench.md, bench.png)",
        description="(a) worker vs a bare update loop, (b) HTTP answering at several "
        "concurrencies vs sequential bare generate, (c) freshness at a sustained ingest rate, "
        "(d) ingest and storage cost per document. Each pair is measured in the same run. "
        "With --mac-scaling, only MAC's memory scaling instead: F1, answer latency and ingest "
        "cost with memory banks of --sizes entries (writes scaling.json, scaling.md, "
        "scaling.png).",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"base model: a packaged short name, a local HF directory or a hub id (default: {DEFAULT_BASE})",
    )
    p.add_argument(
        "--mac",
        default=None,
        metavar="DIR",
        help="trained MAC networks for this model (`uptake meta-train mac`): also measure "
        "freshness in mode mac (with --mac-scaling: the networks studied)",
    )
    p.add_argument("--out", default="bench", help="output directory (default: ./bench)")
    p.add_argument("--quick", action="store_true", help="a short run (the CI regression check)")
    p.add_argument(
        "--fail-below",
        type=float,
        default=None,
        metavar="RATIO",
        help="exit 1 if worker_vs_bare_ratio is below RATIO",
    )
    p.add_argument(
        "--mac-scaling",
        action="store_true",
        help="run only the MAC memory-scaling study (needs --mac): for each size, a fresh bank "
        "of the --targets documents plus filler articles about other new people, with and "
        "without hierarchical aggregation",
    )
    p.add_argument(
        "--sizes",
        type=_ints,
        default=None,
        help="--mac-scaling: comma list of memory sizes in entries (default 10,100,1000,5000)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="--mac-scaling: the stream whose first --targets documents are scored "
        "(default: the world's eval_stream.jsonl)",
    )
    p.add_argument(
        "--targets",
        type=int,
        default=20,
        help="--mac-scaling: target documents (default 20)",
    )
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    if args.mac_scaling:
        return _run_mac_scaling(args)

    from service.bench import BenchConfig, run_bench
    from service.redis_conn import close_embedded
    from service.settings import Settings

    settings = Settings()
    settings.apply_torch_threads()
    model = args.model or DEFAULT_BASE
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    out = Path(args.out)
    flags = (["--quick"] if args.quick else []) + (["--mac", args.mac] if args.mac else [])
    command = shlex.join(["uptake", "bench", *flags, "--model", model, "--out", args.out])
    mac_dir = Path(args.mac) if args.mac else None
    try:
        report = run_bench(model, out, cfg, settings, command=command, mac_dir=mac_dir)
    finally:
        close_embedded()
    print((out / "bench.md").read_text())
    ratio = report["worker_vs_bare_ratio"]
    if args.fail_below is not None and ratio < args.fail_below:
        print(f"FAIL: worker_vs_bare_ratio {ratio:.2f} is below {args.fail_below:g}")
        return 1
    return 0


def _run_mac_scaling(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from adaptation.mac.scaling import ScalingConfig, run_scaling_study
    from adaptation.paths import demo_world_dir

    def fail(why: str) -> int:
        print(f"uptake bench --mac-scaling: {why}", file=sys.stderr)
        return 2

    if not args.mac:
        return fail("needs --mac DIR, trained MAC networks (`uptake meta-train mac`)")
    if args.quick or args.fail_below is not None:
        return fail("--quick and --fail-below are for the service measurements")
    if args.targets < 1:
        return fail(f"--targets must be at least 1, got {args.targets}")
    data = Path(args.data) if args.data else demo_world_dir() / "eval_stream.jsonl"
    if not data.exists():
        return fail(f"{data} does not exist; give --data, or run `uptake world`")
    try:
        cfg = ScalingConfig(**({"sizes": args.sizes} if args.sizes else {}))
    except ValueError as err:
        return fail(str(err))
    model = args.model or DEFAULT_BASE
    flags = ["--mac-scaling", "--mac", args.mac, "--model", model, "--data", str(data)]
    flags += ["--targets", str(args.targets), "--sizes", ",".join(map(str, cfg.sizes))]
    command = shlex.join(["uptake", "bench", *flags, "--out", args.out])
    try:
        run_scaling_study(model, args.mac, data, args.out, cfg, args.targets, command)
    except (OSError, ValueError) as err:
        return fail(str(err))
    print((Path(args.out) / "scaling.md").read_text())
    return 0


def _add_squad_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "squad-split",
        help="split SQuAD dev by title into retention and reading sets for a real base",
        description="Takes the titles that none of the stream's first --limit passages carries "
        "and deals them (sorted) in turn to three sets: retention.jsonl, the questions the base "
        "already answers closed-book (gold-token recall of its answer's first sentence >= "
        "--threshold; an instruct model answers in sentences, which F1 scores near 0.3 when "
        "right), reading.jsonl, passages whose questions are asked in context, and tuning.jsonl, "
        "passages held out of every evaluation. Writes them and split.json, which lists every "
        "title's set, to --out.",
    )
    p.add_argument("--squad", required=True, help="SQuAD-style JSON: the pool (SQuAD dev)")
    p.add_argument("--stream", required=True, help="the evaluated stream (e.g. SQuAD-200)")
    p.add_argument(
        "--limit", type=int, default=50, help="the stream's passages evaluated (default: 50)"
    )
    p.add_argument("--out", required=True, help="directory for the two sets and split.json")
    p.add_argument("--model", default=None, help=f"base model (default: {DEFAULT_BASE})")
    p.add_argument(
        "--threshold",
        type=float,
        default=1.0,
        help="closed-book recall a known question reaches (default: 1.0, every gold token)",
    )
    p.add_argument(
        "--retention-questions",
        type=int,
        default=80,
        help="known questions to find (default: 80)",
    )
    p.add_argument(
        "--reading-passages", type=int, default=20, help="reading passages (default: 20)"
    )
    p.set_defaults(handler=_run_squad_split)


def _run_squad_split(args: argparse.Namespace) -> int:
    import json

    from adaptation.squad_split import build_split

    record = build_split(
        args.squad,
        args.stream,
        args.limit,
        args.model or DEFAULT_BASE,
        args.out,
        threshold=args.threshold,
        retention_questions=args.retention_questions,
        reading_passages=args.reading_passages,
    )
    print(json.dumps({k: v for k, v in record.items() if not k.endswith("_titles")}, indent=2))
    return 0


def _add_trust(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trust",
        help="measure source trust on conflicting facts, and learned trust from source tags",
        description="Three experiments on fresh knowledge-world people (writes trust.json, "
        "trust.md and trust.png to --out). 1: a stream where a 'reliable' and an 'unreliable' "
        "source state some facts differently is learned with equal trust and with trust set; "
        "the share of contested facts won by the reliable value. 2 (IML): after a stage where "
        "tagged sources conflict and QA agrees with one, are new facts under that source's tag "
        "taken up more than under the other's? With an untagged control. 3: how far one "
        "article moves a contested answer, and how long that lasts as more articles are "
        "learned, at the configured update and a strong one (lr 3e-3 × 4).",
    )
    p.add_argument("--out", required=True, help="directory for trust.json, trust.md and trust.png")
    p.add_argument(
        "--model",
        default=None,
        help=f"base model: a packaged short name, a local HF directory or a hub id (default: {DEFAULT_BASE})",
    )
    p.add_argument("--seeds", type=_ints, default=None, help="comma list (default 0,1,2)")
    p.add_argument("--people", type=int, default=None, help="people per seed, experiment 1 (100)")
    p.add_argument("--trusted", type=float, default=None, help="reliable source's trust (1.0)")
    p.add_argument("--distrusted", type=float, default=None, help="unreliable source's (0.2)")
    p.add_argument("--lr", type=float, default=None, help="(default 1e-3)")
    p.add_argument("--steps-per-doc", type=int, default=None, help="(default 2)")
    p.add_argument("--iml-people", type=int, default=None, help="stage-1 people (60)")
    p.add_argument("--iml-new-people", type=int, default=None, help="stage-2 people (60)")
    p.add_argument("--iml-epochs", type=int, default=None, help="stage-1 epochs (3)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(handler=_run_trust)


def _run_trust(args: argparse.Namespace) -> int:
    from adaptation.trust import check_weight
    from adaptation.trust_eval import TrustConfig, run_trust, trust_markdown

    fields = ("seeds", "people", "trusted", "distrusted", "lr", "steps_per_doc", "iml_people")
    fields += ("iml_new_people", "iml_epochs", "device")
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    try:
        for name in ("trusted", "distrusted"):
            if name in given:
                given[name] = check_weight(given[name], f"--{name}")
        cfg = TrustConfig(**given)
    except ValueError as err:
        print(f"uptake trust: {err}", file=sys.stderr)
        return 2
    report = run_trust(args.model or DEFAULT_BASE, args.out, cfg)
    print(trust_markdown(report))
    return 0


def _add_forget_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "forget-check",
        help="measure forgetting: a forgotten document's F1 and the others' answers",
        description="Runs `uptake serve` and `uptake worker` on a fresh store, answers every "
        "question of the stream's first documents on the bare base, ingests them, answers "
        "again, forgets the document whose F1 gained most (DELETE /v1/documents/{id}) and "
        "answers a third time. Prints the forgotten document's F1 before ingest, after ingest "
        "and after the forget, the other documents' mean F1, and the share of their answers the "
        "forget left unchanged.",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"base model: a packaged short name, a local HF directory or a hub id (default: {DEFAULT_BASE})",
    )
    p.add_argument(
        "--data", default=None, help="stream with questions (default: the world's eval stream)"
    )
    p.add_argument("--docs", type=int, default=20, help="how many documents to ingest")
    p.add_argument(
        "--lr",
        type=float,
        default=2e-3,
        help="update learning rate (default: 2e-3, uniform's best swept rate on the demo model)",
    )
    p.add_argument("--steps", type=int, default=1, help="update steps per document")
    p.add_argument(
        "--strategy",
        default=None,
        help="token weighting of the updates: uniform, salient, tfidf or camels (default: "
        "UPTAKE_STRATEGY, else uniform; camels reads UPTAKE_WEIGHTER, else the demo weighting "
        "model)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    p.set_defaults(handler=_run_forget_check)


def _run_forget_check(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from adaptation.paths import demo_world_dir
    from service.forget_check import ForgetConfig, forget_table, run_forget_check, write_figures
    from service.redis_conn import close_embedded

    model = args.model or DEFAULT_BASE
    data = Path(args.data) if args.data else demo_world_dir() / "eval_stream.jsonl"
    if not data.exists():
        print(
            f"uptake forget-check: {data} does not exist; give --data, or run `uptake world`",
            file=sys.stderr,
        )
        return 2
    settings = _checked_settings(args)
    if settings is None:
        return 2
    cfg = ForgetConfig(docs=args.docs, lr=args.lr, steps_per_doc=args.steps)
    flags = ["--model", model, "--data", str(data), "--docs", str(cfg.docs), "--lr", f"{cfg.lr:g}"]
    flags += ["--steps", str(cfg.steps_per_doc), "--strategy", settings.strategy]
    flags += ["--json", args.json] if args.json else []
    try:
        figures = run_forget_check(
            model, data, cfg, settings, command=shlex.join(["uptake", "forget-check", *flags])
        )
    finally:
        close_embedded()
    print(forget_table(figures))
    if args.json:
        write_figures(figures, Path(args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uptake",
        description="Keep a language model's knowledge current: documents in, answers out.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_world,
        _add_bootstrap,
        _add_eval,
        _add_meta_train,
        _add_weights,
        _add_fit_tfidf,
        _add_serve,
        _add_worker,
        _add_up,
        _add_keys,
        _add_bench,
        _add_forget_check,
        _add_trust,
        _add_squad_split,
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


if __name__ == "__main__":
    sys.exit(main())
