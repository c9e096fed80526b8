"""The lab's commands: the world, the demo model, evaluation, meta-training, weights, the
benchmarks, the SQuAD split, trust and forget-check, as sub-commands of the same `uptake`.

Each handler imports what it runs (the lab included), so `uptake --help` and argument errors come
back without loading torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from adaptation.bases import DEFAULT_BASE
from service.cli.options import (
    add_options,
    at_least_one,
    at_least_zero,
    config_values,
    floats,
    ints,
    names,
    opt,
    self_edit_prompt_name,
    trust_weights,
)
from service.cli.serving import checked_settings

if TYPE_CHECKING:
    from adaptation.lab.camels_training import MetaTrainConfig


# How the eval's gradient strategies learn a document: fields of the learner's LearnSettings,
# whose defaults (the service's) hold for those not given.
LEARN_OPTIONS = (
    opt(
        "--epochs",
        "passes over each document's training sequences (its text's chunks, plus its "
        "self-edits for seal), in either protocol (default: %(default)s)",
        type=at_least_one,
        default=1,
    ),
    opt(
        "--rehearse",
        "earlier documents learned again with each new one, as the worker's UPTAKE_REHEARSE "
        "(default: %(default)s, none)",
        type=at_least_zero,
        default=0,
    ),
    opt(
        "--rehearsal-window",
        "how many of the most recent earlier documents rehearsal draws from, as the worker's "
        "UPTAKE_REHEARSAL_WINDOW (default: the same)",
        type=at_least_one,
    ),
    opt(
        "--learn-batch",
        "under --protocol stream, consecutive documents learned K at a time, as the worker's "
        "UPTAKE_LEARN_BATCH: those of one chunk, without self-edits and of one trust share one "
        "step on a padded micro-batch (default: 1, one by one)",
        type=at_least_one,
        metavar="K",
    ),
)
EVAL_OPTIONS = (
    opt("--data", "JSONL stream or SQuAD-style JSON", to=None, required=True),
    opt(
        "--protocol",
        "stream: one adapter (or store) reads the documents once, in order, and is asked "
        "all their questions at the end; single (SEAL's): each document is learned alone from "
        "a fresh adapter, asked its own questions, then the adapter is reset, and uptake is "
        "the mean over documents (default: %(default)s)",
        choices=["stream", "single"],
        default="stream",
    ),
    opt(
        "--model",
        f"base model: a packaged short name, a local HF directory or a hub id (default: {DEFAULT_BASE})",
        to=None,
    ),
    opt(
        "--strategies",
        "comma list of uniform,salient,tfidf,camels,seal,seal-best,rag,mac,mac+rag "
        "(seal trains on the document plus its self-edits: supplied ones, or the template "
        "paraphraser's for a world article; seal-best keeps the best of --best-of-k)",
        type=names,
        default="uniform,salient,tfidf,rag",
    ),
    opt("--out", "directory for report.json, report.md and the plots", to=None, required=True),
    opt(
        "--retention",
        "retention QA file: questions the base already answers, asked closed-book "
        "before and after (default: retention_qa.jsonl beside --data, if any)",
        to=None,
    ),
    opt(
        "--reading",
        "held-out passages with questions (JSONL or SQuAD-style JSON): each question is "
        "asked with its own passage in context, before and after, to tell whether the model "
        "still reads (default: none)",
        to=None,
    ),
    opt("--limit", "use the first N documents", type=int),
    opt("--seed", "one seed (shortcut for --seeds)", to=None, type=int),
    opt("--seeds", "comma list of seeds, e.g. 0,1,2", to=None, type=ints, default=(0,)),
    opt(
        "--lr", "LoRA learning rate, unless swept (default: %(default)s)", type=float, default=1e-3
    ),
    opt(
        "--steps-per-doc",
        "gradient steps on each document, unless swept (default: %(default)s)",
        type=int,
        default=1,
    ),
    opt(
        "--normalisation",
        "divide the weighted loss by the token count, the sum of weights, or a fixed "
        "1,024 (default: %(default)s)",
        default="tokens",
        choices=["tokens", "weights", "fixed"],
    ),
    opt(
        "--lora-rank",
        "LoRA rank, as the service's UPTAKE_LORA_RANK (default: %(default)s)",
        to=None,
        type=int,
        default=16,
    ),
    opt(
        "--lora-alpha",
        "LoRA alpha (the update is scaled by alpha / rank), as the service's "
        "UPTAKE_LORA_ALPHA (default: %(default)s)",
        to=None,
        type=int,
        default=32,
    ),
    opt(
        "--lora-targets",
        "comma list of module names to adapt, e.g. gate_proj,up_proj,down_proj "
        "(default: every attention and MLP projection present)",
        to=None,
        type=names,
    ),
    opt(
        "--full-finetune",
        "train every weight of the base instead of a LoRA adapter (the baseline for "
        "LoRA's uptake and retention; on the demo, rates of 5e-5 to 1e-4 suited it)",
        action="store_true",
    ),
    opt(
        "--sweep-lrs",
        "comma list of learning rates to sweep on --val; the best per strategy "
        "(by uptake, subject to --retention-floor) is used",
        type=floats,
        default=(),
    ),
    opt(
        "--sweep-steps",
        "comma list of steps per document to sweep with each rate (default: --steps-per-doc)",
        type=ints,
        default=(),
    ),
    opt("--val", "validation stream for the sweep", to=None),
    opt(
        "--retention-floor",
        "the sweep keeps only settings whose retention is at least this (default: %(default)s)",
        type=float,
        default=0.9,
    ),
    opt("--weighter", "CaMeLS weighting model dir (for camels)", to="weighter_path"),
    opt("--mac", "trained MAC dir (for mac, mac+rag)", to="mac_path"),
    opt(
        "--min-similarity",
        "rag, mac, mac+rag: read only documents at least this similar to the question (MiniLM "
        "cosine); a question with none is answered closed-book (default: -1, all)",
        type=float,
        default=-1.0,
    ),
    opt("--checkpoints", "points on the uptake curve", type=int, default=5),
    opt(
        "--retention-matrix",
        "after every document, score every earlier document's questions; draws the heat maps",
        action="store_true",
    ),
    opt(
        "--best-of-k",
        "seal-best: candidate self-edits per document, each trained from the same state and "
        "scored on probe questions (default 3)",
        type=int,
        default=3,
    ),
    opt(
        "--self-edits",
        "seal's self-edits: supplied (those the documents carry, e.g. SQuAD-200's Qwen "
        "rewrites, or the paraphraser's for a world article) or own (written by the base "
        "with --self-edit-prompt, cached under UPTAKE_HOME/self_edits); default: supplied "
        "where a document carries any, else own",
        choices=["own", "supplied"],
    ),
    opt(
        "--self-edit-prompt",
        "own self-edits: the named prompt the base writes them with (implications, "
        "long-implications, rewrite, self-qa; default: the service's, UPTAKE_SELF_EDIT_PROMPT's)",
        type=self_edit_prompt_name,
    ),
    opt(
        "--self-edit-k",
        "own self-edits the base writes per document for seal (seal-best writes --best-of-k) "
        "(default: %(default)s)",
        type=at_least_one,
        default=1,
    ),
    opt(
        "--self-edit-tokens",
        "most new tokens in one written self-edit (default: %(default)s)",
        type=at_least_one,
        default=128,
    ),
    opt(
        "--no-self-edit-cache",
        "write own self-edits and probe questions anew instead of reading them back",
        action="store_false",
        dest="self_edit_cache",
    ),
    opt(
        "--trust",
        "trust weights in [0, 1] per document source, scaling each document's update "
        "(unlisted sources: 1.0)",
        type=trust_weights,
        default={},
        metavar="SOURCE=W,...",
    ),
    opt(
        "--source-tags",
        "prefix training text with a tag per source, the service's tags "
        "(UPTAKE_SOURCE_TAGS; IML, experimental)",
        to=None,
        action="store_true",
    ),
    opt("--device", "cpu or cuda (default: cuda when available)"),
    opt(
        "--dtype",
        "the base's weights, as the service's UPTAKE_DTYPE (default auto: bfloat16 on a GPU, "
        "float32 on a CPU)",
        choices=["auto", "float32", "bfloat16"],
    ),
)
CAMELS_OPTIONS = (
    opt(
        "--inner-optimizer",
        "inner step: plain SGD (default), or the worker's clipped Adam with its moments "
        "carried across documents",
        choices=["sgd", "adam"],
    ),
    opt("--inner-lr", "inner learning rate", type=float),
    opt("--outer-lr", "outer Adam lr", type=float),
    opt("--episode-docs", "documents per episode", type=int),
    opt("--reset-every", "documents between LoRA resets", type=int),
    opt("--c-kl", "locality weight", type=float),
    opt("--grad-accum", "episodes per outer step", type=int),
    opt("--steps", "outer steps: the budget, the same model on any machine", type=int),
    opt(
        "--minutes",
        "also stop within this many minutes (default: no limit; the model then depends on "
        "the machine's speed)",
        type=float,
    ),
    opt("--val-every", "outer steps between validations", type=int),
    opt("--val-episodes", "fixed validation episodes", type=int),
    opt("--normalisation", "inner loss normalisation", choices=["tokens", "weights", "fixed"]),
    opt("--max-doc-tokens", "base tokens of each document the inner step reads", type=int),
    opt("--lora-rank", "rank of the base's LoRA adapter", type=int),
    opt(
        "--body",
        "a pretrained causal LM (packaged base name or HF directory) whose embeddings, first "
        "--body-layers layers and final norm become the weighting model's body, with its "
        "tokenizer (default: a small body built from scratch, --hidden and --layers)",
    ),
    opt("--body-layers", "layers of --body kept", type=at_least_one),
    opt(
        "--freeze-layers",
        "hold the body's embeddings and its first N layers fixed (default: train everything)",
        type=at_least_zero,
    ),
    opt("--hidden", "width of a body built from scratch", to=None, type=int),
    opt("--layers", "layers of a body built from scratch", to=None, type=int),
    opt(
        "--tokenizer",
        "the weighting model's own tokenizer directory (default: the base's)",
        to=None,
    ),
    opt("--device", "cpu or cuda (default: cuda when available)", to=None),
    opt("--seed", "seed for episodes and initialisation", type=int),
)
MAC_OPTIONS = (
    opt("--epochs", "passes over the training documents", type=int),
    opt("--batch-docs", "documents per step (the memory)", type=int),
    opt("--lr", "Adam learning rate", type=float),
    opt(
        "--backprop-dropout",
        "fraction of the batch's documents amortized with gradient",
        type=float,
    ),
    opt("--tokens", "T: modulation length per document", to="num_tokens", type=int),
    opt("--width", "encoder width", type=int),
    opt("--layers", "encoder layers", type=int),
    opt(
        "--encoder",
        "what reads the documents: own (a small encoder of the networks' own) or base (the "
        "frozen base, read out at --encoder-layer into the T tokens by a small head)",
        choices=("own", "base"),
    ),
    opt(
        "--question-encoder",
        "what reads the questions: own or base (default: as --encoder)",
        choices=("own", "base"),
    ),
    opt(
        "--encoder-layer",
        "with base: the hidden state read (0 = embeddings, -1 = last layer)",
        type=int,
    ),
    opt(
        "--distractors",
        "modulations of earlier batches kept in the memory beside the batch's own, so training "
        "reads banks as large as the service's",
        type=int,
    ),
    opt(
        "--retention-weight",
        "weight of the KL that keeps the plain base's answers to questions the memory does not "
        "hold (0: QA loss only)",
        type=float,
    ),
    opt("--steps", "stop after this many steps", to="max_steps", type=int),
    opt(
        "--minutes",
        "stop training after this long (a short F1 evaluation follows)",
        to=None,
        type=float,
    ),
    opt("--max-train-docs", "train on the first N documents only", type=int),
    opt("--eval-questions", "validation questions answered at the end for F1 (0: skip)", type=int),
    opt("--seed", "seed for batches and initialisation", type=int),
    opt("--device", "cpu or cuda (default: cuda when present)", to=None),
)


def add_world(sub: argparse._SubParsersAction) -> None:
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
    from adaptation.lab.conflicts import ConflictConfig, write_conflicts
    from adaptation.lab.world import WorldConfig, write_world

    cfg = WorldConfig(seed=args.seed)
    if args.people:
        cfg = cfg.replace(pretrain_people=args.people)
    paths = write_world(args.out, cfg)
    if args.conflicts:
        paths["conflicts"] = write_conflicts(args.out, cfg, ConflictConfig(people=args.conflicts))
    for name, path in paths.items():
        print(f"{name:<20} {path}")
    return 0


def add_bootstrap(sub: argparse._SubParsersAction) -> None:
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

    from adaptation.lab import bootstrap
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


def add_eval(sub: argparse._SubParsersAction) -> None:
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
    add_options(p, (*EVAL_OPTIONS, *LEARN_OPTIONS))
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from adaptation.lab.evaluation import EvalConfig, report_markdown, run_eval
    from adaptation.learner import LearnSettings
    from adaptation.modeling import DEFAULT_TARGET_MODULES, LoraSettings

    cfg = EvalConfig(
        **config_values(args, EVAL_OPTIONS),
        lora=LoraSettings(
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            target_modules=args.lora_targets or DEFAULT_TARGET_MODULES,
        ),
        learning=LearnSettings(
            tag_salt="" if args.source_tags else None,
            **config_values(args, LEARN_OPTIONS, given_only=True),
        ),
        seeds=(args.seed,) if args.seed is not None else args.seeds,
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


def add_meta_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "meta-train",
        help="meta-train a method's learned part (camels: the token-weighting model)",
    )
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    for add in (_add_meta_train_camels, _add_meta_train_mac):
        add(methods)


def _meta_train_data_flags(
    p: argparse.ArgumentParser, out_help: str, quick_help: str, several: bool = False
) -> None:
    """What every meta-training method reads and writes; `several` takes comma lists of files."""
    files = {"type": names, "metavar": "FILE[,FILE...]"} if several else {}
    p.add_argument("--base", required=True, help="base model: packaged name, directory or hub id")
    p.add_argument(
        "--train", required=True, help="documents with questions (JSONL or SQuAD JSON)", **files
    )
    p.add_argument("--val", required=True, help="validation documents with questions", **files)
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
        "--steps 563. --body starts the weighting model from a pretrained LM's first layers; "
        "--train and --val take several files, e.g. the SQuAD split's tuning.jsonl (uptake "
        "squad-split) and the world's meta_train.jsonl (uptake world). The best checkpoint "
        "by validation outer loss is written to --out. Unset options take the defaults of "
        "adaptation.lab.camels_training.MetaTrainConfig; the run prints and records the settings.",
    )
    _meta_train_data_flags(
        p, "directory for the weighting model", "a tiny smoke run (seconds, for tests)", True
    )
    add_options(p, CAMELS_OPTIONS)
    p.set_defaults(handler=_run_meta_train_camels)


def _meta_train_camels_config(args: argparse.Namespace) -> MetaTrainConfig:
    import dataclasses

    from adaptation.lab.camels_training import MetaTrainConfig

    overrides = config_values(args, CAMELS_OPTIONS, given_only=True)
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

    from adaptation.lab.camels_training import meta_train

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
        "all their questions, each reading a prefix aggregated over the whole batch "
        "(plus --distractors modulations of earlier batches); --retention-weight adds the KL "
        "that keeps the plain base's answers to the next batch's questions, which the memory "
        "does not hold. The best checkpoint by validation loss (answer NLL plus the weighted "
        "KL) is written to --out as a MAC directory, with "
        "training.json. Unset options take the defaults of "
        "adaptation.lab.mac_training.MacTrainConfig (or its QUICK settings with --quick).",
    )
    _meta_train_data_flags(
        p, "directory for the MAC system", "a tiny smoke run (under 2 minutes)", several=True
    )
    add_options(p, MAC_OPTIONS)
    p.set_defaults(handler=_run_meta_train_mac)


def _run_meta_train_mac(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from adaptation.data import read_documents
    from adaptation.lab.mac_training import QUICK, MacTrainConfig, train_mac

    overrides = config_values(args, MAC_OPTIONS, given_only=True)
    if args.minutes is not None:
        overrides["time_limit_s"] = args.minutes * 60.0
    try:
        config = dataclasses.replace(QUICK if args.quick else MacTrainConfig(), **overrides)
        print(json.dumps(dataclasses.asdict(config)))
        train = [d for path in args.train for d in read_documents(path)]
        val = [d for path in args.val for d in read_documents(path)]
        report = train_mac(args.base, train, val, args.out, config, device=args.device)
    except (OSError, ValueError) as exc:
        print(f"uptake meta-train mac: {exc}", file=sys.stderr)
        return 2
    summary = dataclasses.asdict(report)
    for verbose in ("config", "val_history"):
        summary.pop(verbose)
    print(json.dumps(summary, indent=2))
    return 0


def add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="show a weighting model's per-token weights on some text",
        description="Prints the text with each token's background coloured by its weight "
        "(relative to the largest in the text), and optionally draws a PNG heat-strip. With "
        "--breakdown, instead tells how much weight falls on the facts, the entity, the "
        "distractors and the filler of a knowledge-world stream or of SQuAD passages.",
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
        help="documents with questions, a world stream (e.g. eval_stream.jsonl) or SQuAD JSON: "
        "print each weighting's mean weight per character class (fact: the questions' answers "
        "in the text; entity: a world article's subject; distractor: other names, numbers and "
        "dates; filler: the rest), relative to the article's mean (1 = average), and its share",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="with --breakdown, the first N documents only"
    )
    p.set_defaults(handler=_run_weights)


def _run_weights(args: argparse.Namespace) -> int:
    if args.breakdown:
        return _run_weight_breakdown(args)
    from pathlib import Path

    from adaptation.lab.weight_display import ansi_rendering, heat_strip_png, summary, weight_table
    from adaptation.weighting.camels import CamelsWeighter

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
    from adaptation.lab.weight_breakdown import breakdown_table, weight_breakdown
    from adaptation.weighting import make_weighter

    try:
        docs = read_documents(args.breakdown, args.limit)
        corpus = [d.text for d in docs]
        weighters = {
            name: make_weighter(name, corpus=corpus)
            if name in ("uniform", "salient", "tfidf")
            else make_weighter("camels", path=os.path.expanduser(name))
            for name in names(args.weighter)
        }
    except (FileNotFoundError, ValueError) as exc:
        print(f"uptake weights: {exc}", file=sys.stderr)
        return 2
    results = {name: weight_breakdown(w, docs) for name, w in weighters.items()}
    print(f"{len(docs)} articles of {args.breakdown}: relative weight (share of all weight)")
    print(breakdown_table(results))
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure the service against bare loops (writes bench.json, bench.md, bench.png)",
        description="(a) worker vs a bare update loop, (b) HTTP answering at several "
        "concurrencies vs sequential bare generate, (c) freshness at a sustained ingest rate, "
        "split into stages (queue and update, snapshot and publish, the API's switch, the "
        "answer), (d) ingest and storage cost per document. Each pair is measured in the same run. "
        "With --mac-scaling, only MAC's memory scaling instead: F1, answer latency and ingest "
        "cost with memory banks of --sizes entries (writes scaling.json, scaling.md, "
        "scaling.png). With --cpu-options, only the CPU settings study instead: threads, "
        "dtype, documents per step, a static KV cache (and with --compile, torch.compile), "
        "each against float32 on one thread (writes cpu-options.json, .md, .png).",
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
        type=ints,
        default=None,
        help="--mac-scaling: comma list of memory sizes in entries (default 10,100,1000,5000)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="--mac-scaling: JSONL or SQuAD-style JSON whose first --targets documents are "
        "scored and whose later ones are the first filler (default: the world's "
        "eval_stream.jsonl)",
    )
    p.add_argument(
        "--targets",
        type=int,
        default=20,
        help="--mac-scaling: target documents (default 20)",
    )
    p.add_argument(
        "--ingest-rate",
        type=float,
        default=None,
        metavar="DOCS_PER_S",
        help="(c): documents per second posted in the freshness run (default 1)",
    )
    p.add_argument(
        "--cpu-options",
        action="store_true",
        help="run only the CPU settings study: a LoRA step and an answer under each setting",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="--cpu-options: also time torch.compile (compiling takes minutes on a CPU)",
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="--cpu-options: interleaved rounds (default 3)"
    )
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import dataclasses
    import shlex
    from pathlib import Path

    if args.mac_scaling:
        return _run_mac_scaling(args)
    if args.cpu_options:
        return _run_cpu_options(args)

    from service.bench import BenchConfig, run_bench
    from service.redis_conn import close_embedded
    from service.settings import Settings

    settings = Settings()
    settings.apply_torch_threads()
    model = args.model or DEFAULT_BASE
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if args.ingest_rate is not None:
        if args.ingest_rate <= 0:
            print(
                f"uptake bench: --ingest-rate must be above 0, got {args.ingest_rate}",
                file=sys.stderr,
            )
            return 2
        cfg = dataclasses.replace(cfg, ingest_rate=args.ingest_rate)
    out = Path(args.out)
    flags = (["--quick"] if args.quick else []) + (["--mac", args.mac] if args.mac else [])
    flags += ["--ingest-rate", f"{args.ingest_rate:g}"] if args.ingest_rate is not None else []
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


def _run_cpu_options(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from adaptation.lab.cpu_options import run_cpu_options
    from service.backends.lora import build_weighter
    from service.bench import stream_documents
    from service.settings import Settings

    if args.rounds < 1:
        print(f"uptake bench --cpu-options: --rounds must be at least 1, got {args.rounds}")
        return 2
    model = args.model or DEFAULT_BASE
    docs = stream_documents(8)[:8]
    flags = ["--cpu-options", "--model", model, "--rounds", str(args.rounds)]
    flags += ["--compile"] if args.compile else []
    command = shlex.join(["uptake", "bench", *flags, "--out", args.out])
    run_cpu_options(
        model,
        build_weighter(Settings()),
        [d.text for d in docs],
        [d.questions[0].question for d in docs],
        Path(args.out),
        rounds=args.rounds,
        compile_too=args.compile,
        command=command,
    )
    print((Path(args.out) / "cpu-options.md").read_text())
    return 0


def _run_mac_scaling(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from adaptation.lab.mac_scaling import ScalingConfig, run_scaling_study
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


def add_squad_split(sub: argparse._SubParsersAction) -> None:
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

    from adaptation.lab.squad_split import build_split

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


def add_trust(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--seeds", type=ints, default=None, help="comma list (default 0,1,2)")
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
    from adaptation.lab.trust_eval import TrustConfig, run_trust, trust_markdown
    from adaptation.trust import check_weight

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


def add_forget_check(sub: argparse._SubParsersAction) -> None:
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
    import tempfile
    from pathlib import Path

    from adaptation.lab.forget_check import (
        ForgetConfig,
        forget_table,
        run_forget_check,
        write_figures,
    )
    from adaptation.paths import demo_world_dir
    from service.redis_conn import close_embedded, redis_url

    model = args.model or DEFAULT_BASE
    data = Path(args.data) if args.data else demo_world_dir() / "eval_stream.jsonl"
    if not data.exists():
        print(
            f"uptake forget-check: {data} does not exist; give --data, or run `uptake world`",
            file=sys.stderr,
        )
        return 2
    settings = checked_settings(args)
    if settings is None:
        return 2
    cfg = ForgetConfig(docs=args.docs, lr=args.lr, steps_per_doc=args.steps)
    flags = ["--model", model, "--data", str(data), "--docs", str(cfg.docs), "--lr", f"{cfg.lr:g}"]
    flags += ["--steps", str(cfg.steps_per_doc), "--strategy", settings.strategy]
    flags += ["--json", args.json] if args.json else []
    command = shlex.join(["uptake", "forget-check", *flags])
    # Without UPTAKE_REDIS_URL, an embedded Redis of the run's own, in a directory it deletes.
    with tempfile.TemporaryDirectory(prefix="uptake-forget-redis-") as tmp:
        try:
            url = redis_url(settings.model_copy(update={"store_dir": Path(tmp)}))
            env = settings.model_copy(update={"redis_url": url}).child_env()
            figures = run_forget_check(model, data, cfg, env, command=command)
        finally:
            close_embedded()
    print(forget_table(figures))
    if args.json:
        write_figures(figures, Path(args.json))
    return 0
